"""Text conditioning: --prompt-embeds files, the umT5 encoder of a pipeline dir, the embedding cache."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from attn_harness.core.errors import HarnessError
from attn_harness.core.probe import Probe
from attn_harness.core.store import read_dataset, write_dataset
from attn_harness.model.models import TINY_CONFIG, TINY_TEXT_TOKENS, build_tiny_random, hash_prompt_embedding, load_model
from attn_harness.model.prompts import (
    EMBEDS_KEY,
    NEGATIVE_KEY,
    embedding_fingerprint,
    load_prompt_embeds,
    save_prompt_embeds,
)
from attn_harness.sampling.extract import extract

TEXT_DIM = TINY_CONFIG["text_dim"]
PROBE = Probe(num_frames=9, height=32, width=32, sample_steps=2, capture_steps=("last",), device="cpu", guidance=3.0)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTN_HARNESS_CACHE", str(tmp_path / "cache"))


def _embedding(seed: int) -> torch.Tensor:
    return torch.randn(1, TINY_TEXT_TOKENS, TEXT_DIM, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("form", ["pt-tensor", "pt-dict", "safetensors"])
def test_prompt_embeds_files_load_in_every_accepted_form(tmp_path, form):
    prompt, negative = _embedding(1), _embedding(2)
    path = tmp_path / ("e.safetensors" if form == "safetensors" else "e.pt")
    if form == "pt-tensor":
        torch.save(prompt, path)
    elif form == "pt-dict":
        torch.save({EMBEDS_KEY: prompt, NEGATIVE_KEY: negative}, path)
    else:
        save_prompt_embeds(path, prompt, negative)
    embeds = load_prompt_embeds(path, TEXT_DIM)
    assert torch.equal(embeds.prompt, prompt)
    assert embeds.negative is None if form == "pt-tensor" else torch.equal(embeds.negative, negative)


@pytest.mark.parametrize(
    "content, message",
    [
        (torch.zeros(16, 64), r"expected a float tensor \[1, tokens, text_dim\]; got a float32 tensor of shape \[16, 64\]"),
        (torch.zeros(1, 16, 64, dtype=torch.int64), r"got a int64 tensor of shape \[1, 16, 64\]"),
        (b"not a tensor", "found bytes"),
        (torch.zeros(1, 16, 32), "text width 32 does not match the model's text_dim 64"),
        ({"embeds": torch.zeros(1, 16, 64)}, r"dict with 'prompt_embeds'.*found \['embeds'\]"),
        ({EMBEDS_KEY: torch.zeros(1, 16, 64), NEGATIVE_KEY: torch.zeros(2, 16, 64)}, r"\[negative_prompt_embeds\]: expected"),
    ],
)
def test_bad_prompt_embeds_files_name_the_file_and_the_problem(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    torch.save(content, path)
    with pytest.raises(HarnessError, match=message) as info:
        load_prompt_embeds(path, TEXT_DIM)
    assert "bad.pt" in str(info.value)


def test_dir_without_encoder_or_embeddings_is_a_clear_error(tmp_path):
    build_tiny_random().save_pretrained(tmp_path / "model")
    with pytest.raises(HarnessError, match="no text encoder found.*pass --prompt-embeds FILE"):
        extract(str(tmp_path / "model"), PROBE, progress=False)


def test_prompt_embeds_without_negative_and_without_encoder_asks_for_one_under_cfg(tmp_path):
    build_tiny_random().save_pretrained(tmp_path / "model")
    torch.save(_embedding(1), tmp_path / "e.pt")
    with pytest.raises(HarnessError, match="e.pt: holds no 'negative_prompt_embeds'.*guidance to 1"):
        extract(str(tmp_path / "model"), PROBE.replace(prompt_embeds=str(tmp_path / "e.pt")), progress=False)
    ds = extract(str(tmp_path / "model"), PROBE.replace(prompt_embeds=str(tmp_path / "e.pt"), guidance=1.0), progress=False)
    assert ds.attrs["negative_prompt_embedding_fingerprint"] == ""


@pytest.mark.numerics  # bitwise across load paths: CI reruns it under forced CPU ISAs
def test_prompt_embeds_file_reproduces_the_embedded_models_run_on_a_checkpoint_dir(tmp_path):
    build_tiny_random().save_pretrained(tmp_path / "model")
    prompt = hash_prompt_embedding(PROBE.prompt, TINY_TEXT_TOKENS, TEXT_DIM)
    negative = hash_prompt_embedding(PROBE.negative_prompt, TINY_TEXT_TOKENS, TEXT_DIM)
    save_prompt_embeds(tmp_path / "e.safetensors", prompt, negative)
    probe = PROBE.replace(prompt_embeds=str(tmp_path / "e.safetensors"))
    from_file = extract(str(tmp_path / "model"), probe, progress=False)
    embedded = extract("tiny-random", PROBE, progress=False)
    np.testing.assert_array_equal(from_file.logits.values, embedded.logits.values)
    assert from_file.attrs["prompt_embedding_fingerprint"] == embedding_fingerprint(prompt)
    assert from_file.attrs["prompt_encoder"] == f"prompt embeddings file {tmp_path / 'e.safetensors'}"
    probe = PROBE.replace(prompt_embeds=str(tmp_path / "e.safetensors"), prompt="something else")
    other = extract("tiny-random", probe, progress=False)
    np.testing.assert_array_equal(other.logits.values, embedded.logits.values)  # the file wins over the prompt text


# --- the umT5 encoder of a diffusers pipeline dir (needs the optional transformers) ---------------

WORDS = ["a", "red", "square", "moving", "from", "left", "to", "right", "blue", "circle"]


VOCAB = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}


def word_tokenizer():
    """A word-level umT5-style tokenizer (</s> appended, <pad> 0) built offline."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tokenizer = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_umt5(seed: int, d_kv: int = 16):
    """A random umT5 encoder as wide as the tiny transformer's text_dim."""
    transformers = pytest.importorskip("transformers")
    config = transformers.UMT5Config(
        vocab_size=len(VOCAB), d_model=TEXT_DIM, d_kv=d_kv, d_ff=96, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    return transformers.UMT5EncoderModel(config).eval()


def write_pipeline_with_text_encoder(root, seed: int = 0):
    """A diffusers pipeline dir: tiny transformer + a tiny random umT5 encoder + a word-level tokenizer."""
    (root / "model_index.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    build_tiny_random().save_pretrained(root / "transformer")
    word_tokenizer().save_pretrained(root / "tokenizer")
    tiny_umt5(seed).save_pretrained(root / "text_encoder")
    return root


def test_pipeline_text_encoder_encodes_real_tokens_and_zeroes_the_padding(tmp_path):
    transformers = pytest.importorskip("transformers")
    root = write_pipeline_with_text_encoder(tmp_path / "pipe")
    loaded = load_model(root)
    assert loaded.prompt_encoder.startswith("umT5 encoder")
    embedding = loaded.encode_prompt("a red square")
    assert embedding.shape == (1, TINY_TEXT_TOKENS, TEXT_DIM)
    encoder = transformers.UMT5EncoderModel.from_pretrained(root / "text_encoder")
    ids = torch.tensor([[3, 4, 5, 1]])  # a red square </s>
    with torch.inference_mode():
        expected = encoder(ids, torch.ones_like(ids)).last_hidden_state
    torch.testing.assert_close(embedding[:, :4], expected, rtol=1e-5, atol=1e-6)  # padding masked out: same values
    assert (embedding[:, 4:] == 0).all()


def test_encoded_prompts_are_cached_on_disk_keyed_by_prompt_and_encoder(tmp_path):
    pytest.importorskip("transformers")
    root = write_pipeline_with_text_encoder(tmp_path / "pipe")
    first = load_model(root).encode_prompt
    embedding = first("a blue circle")
    assert first.calls == 1 and first.cache_path("a blue circle").is_file()
    again = load_model(root).encode_prompt
    assert torch.equal(again("a blue circle"), embedding) and again.calls == 0
    assert again.cache_path("a red circle") != again.cache_path("a blue circle")
    other = load_model(write_pipeline_with_text_encoder(tmp_path / "other", seed=1)).encode_prompt
    assert other.cache_path("a blue circle") != again.cache_path("a blue circle")
    assert not torch.equal(other("a blue circle"), embedding)


def test_extract_on_a_pipeline_dir_records_the_encoder_and_embedding_fingerprint(tmp_path):
    pytest.importorskip("transformers")
    root = write_pipeline_with_text_encoder(tmp_path / "pipe")
    ds = extract(str(root), PROBE.replace(prompt="a red square moving"), progress=False)
    loaded = load_model(root)
    assert ds.attrs["prompt_encoder"] == loaded.prompt_encoder
    assert ds.attrs["prompt_embedding_fingerprint"] == embedding_fingerprint(loaded.encode_prompt("a red square moving"))
    assert ds.attrs["checkpoint_layout"] == "diffusers-pipeline"


def test_text_mass_of_a_model_with_a_tokenizer_names_its_tokens_and_marks_the_padding(tmp_path):
    pytest.importorskip("transformers")
    root = write_pipeline_with_text_encoder(tmp_path / "pipe")
    ds = extract(str(root), PROBE.replace(prompt="a red square", metrics=("logits", "text_mass")), progress=False)
    strings = ds["text_token_string"].values.tolist()
    assert strings[:5] == ["a", "red", "square", "</s>", "<pad>"] and len(strings) == TINY_TEXT_TOKENS
    assert ds["text_content"].values.tolist() == [1, 1, 1, 1] + [0] * (TINY_TEXT_TOKENS - 4)
    back = read_dataset(write_dataset(ds, tmp_path / "t.nc"))
    assert back["text_token_string"].values.tolist() == strings


def test_original_umt5_pth_is_named_in_the_error_with_what_to_do_instead(tmp_path):
    from tests.test_layouts import write_original_dir

    write_original_dir(build_tiny_random(), tmp_path / "wan")
    (tmp_path / "wan" / "models_t5_umt5-xxl-enc-bf16.pth").write_bytes(b"")
    expected = "found models_t5_umt5-xxl-enc-bf16.pth but no google/umt5-xxl/ tokenizer.*--prompt-embeds"
    with pytest.raises(HarnessError, match=expected):
        load_model(tmp_path / "wan").encode_prompt("a red square")


# --- the original release's umT5 weights (Wan's own T5 names) + google/umt5-xxl tokenizer ---------

ORIGINAL_T5 = "models_t5_umt5-xxl-enc-bf16.pth"
# transformers UMT5EncoderModel name (full match) -> Wan T5Encoder name: the inverse of attn_harness.model.umt5's table.
_TO_WAN = (
    (r"shared\.weight", "token_embedding.weight"),
    (r"encoder\.final_layer_norm\.weight", "norm.weight"),
    (r"encoder\.block\.(\d+)\.layer\.0\.layer_norm\.weight", r"blocks.\1.norm1.weight"),
    (r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])\.weight", r"blocks.\1.attn.\2.weight"),
    (
        r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.weight",
        r"blocks.\1.pos_embedding.embedding.weight",
    ),
    (r"encoder\.block\.(\d+)\.layer\.1\.layer_norm\.weight", r"blocks.\1.norm2.weight"),
    (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\.weight", r"blocks.\1.ffn.gate.0.weight"),
    (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\.weight", r"blocks.\1.ffn.fc1.weight"),
    (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\.weight", r"blocks.\1.ffn.fc2.weight"),
)


def to_wan_t5(encoder) -> dict[str, torch.Tensor]:
    """A UMT5EncoderModel's weights under Wan's T5Encoder names, in bfloat16 as the release ships them."""
    out = {}
    for key, value in encoder.state_dict().items():
        if key == "encoder.embed_tokens.weight":
            continue  # tied to shared.weight; Wan stores the embedding once
        (name,) = [re.sub(pattern, wan, key) for pattern, wan in _TO_WAN if re.fullmatch(pattern, key)]
        out[name] = value.detach().to(torch.bfloat16).clone()
    return out


def bf16_umt5(seed: int):
    """A tiny umT5 whose float32 weights are bfloat16 values, so the bf16 file holds them exactly.

    d_kv 8 x 4 heads = 32 is not d_model 64, so the conversion must read d_kv from q's shape."""
    encoder = tiny_umt5(seed, d_kv=8)
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.copy_(parameter.to(torch.bfloat16).float())
    return encoder


def write_original_with_umt5(root, encoder, state: dict[str, torch.Tensor] | None = None):
    """An original Wan release dir: tiny transformer + Wan-keyed umT5 .pth + google/umt5-xxl tokenizer."""
    from tests.test_layouts import write_original_dir

    write_original_dir(build_tiny_random(), root)
    torch.save(to_wan_t5(encoder) if state is None else state, root / ORIGINAL_T5)
    word_tokenizer().save_pretrained(root / "google" / "umt5-xxl")
    return root


def _reference_embedding(encoder, prompt: str, text_tokens: int) -> torch.Tensor:
    tokens = word_tokenizer()(prompt, padding="max_length", max_length=text_tokens, return_tensors="pt")
    with torch.inference_mode():
        hidden = encoder(tokens.input_ids, tokens.attention_mask).last_hidden_state
    return hidden * tokens.attention_mask[..., None]  # real tokens kept, padding zeroed


def test_wan_t5_key_inverse_round_trips_through_the_conversion(tmp_path):
    pytest.importorskip("transformers")
    from attn_harness.model.umt5 import to_transformers_keys

    encoder = bf16_umt5(0)
    converted = to_transformers_keys(to_wan_t5(encoder), tmp_path / ORIGINAL_T5)
    expected = encoder.state_dict()
    assert sorted(converted) == sorted(expected)
    assert all(torch.equal(converted[k].float(), expected[k]) for k in expected)


def test_original_umt5_pth_encodes_exactly_as_the_transformers_model_it_was_written_from(tmp_path):
    encoder = bf16_umt5(0)
    root = write_original_with_umt5(tmp_path / "wan", encoder)
    loaded = load_model(root)
    assert loaded.prompt_encoder.startswith(f"umT5 encoder {root / ORIGINAL_T5} (Wan T5 keys converted")
    embedding = loaded.encode_prompt("a red square")
    text_tokens = 512  # the original config's text_len
    assert embedding.shape == (1, text_tokens, TEXT_DIM)
    # Same transformers module, same float32 weights (bf16 values stored exactly), same padded ids and
    # mask, same CPU kernels: the result is bitwise equal, not merely close.
    assert torch.equal(embedding, _reference_embedding(encoder, "a red square", text_tokens))
    assert (embedding[:, 4:] == 0).all() and (embedding[:, :4] != 0).any()
    again = load_model(root).encode_prompt
    assert torch.equal(again("a red square"), embedding) and again.calls == 0  # served from the cache
    # The check discriminates the one pair of names that does not say which is which: gate vs fc1.
    swapped = to_wan_t5(encoder)
    for block in (0, 1):
        gate, fc1 = f"blocks.{block}.ffn.gate.0.weight", f"blocks.{block}.ffn.fc1.weight"
        swapped[gate], swapped[fc1] = swapped[fc1], swapped[gate]
    other = load_model(write_original_with_umt5(tmp_path / "swapped", encoder, swapped)).encode_prompt("a red square")
    assert not torch.allclose(other, embedding, atol=1e-3)


def test_extract_on_an_original_dir_encodes_prompts_without_prompt_embeds(tmp_path):
    root = write_original_with_umt5(tmp_path / "wan", bf16_umt5(0))
    ds = extract(str(root), PROBE.replace(prompt="a red square moving"), progress=False)
    loaded = load_model(root)
    assert ds.attrs["checkpoint_layout"] == "wan-original"
    assert ds.attrs["prompt_encoder"] == loaded.prompt_encoder
    assert ds.attrs["prompt_embedding_fingerprint"] == embedding_fingerprint(loaded.encode_prompt("a red square moving"))
    assert ds.attrs["negative_prompt_embedding_fingerprint"] == embedding_fingerprint(loaded.encode_prompt(PROBE.negative_prompt))


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda s: {
                **s,
                "pos_embedding.embedding.weight": s["blocks.0.pos_embedding.embedding.weight"],
                "head.weight": s["norm.weight"],
            },
            r"not a Wan umT5 encoder state dict; unexpected keys head\.weight, pos_embedding\.embedding\.weight "
            r"\(expected Wan's T5Encoder",
        ),
        (
            lambda s: {k: v for k, v in s.items() if k != "blocks.1.ffn.fc2.weight"},
            r"do not form a 2-layer encoder: missing encoder\.block\.1\.layer\.1\.DenseReluDense\.wo\.weight",
        ),
    ],
    ids=["unexpected-keys", "missing-key"],
)
def test_original_umt5_pth_with_wrong_keys_is_one_error_naming_file_and_keys(tmp_path, change, message):
    encoder = bf16_umt5(0)
    root = write_original_with_umt5(tmp_path / "wan", encoder, change(to_wan_t5(encoder)))
    with pytest.raises(HarnessError, match=message) as info:
        load_model(root).encode_prompt("a red square")
    assert str(info.value).startswith(f"{root / ORIGINAL_T5}: ")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_corrupt_embeddings_file_is_one_line_naming_it(tmp_path, suffix):
    path = tmp_path / f"embeds{suffix}"
    path.write_bytes(b"\x08" + bytes(7) + b'{"a": 1}')
    with pytest.raises(HarnessError, match=f"embeds{suffix} is not a (readable safetensors file|file written by torch.save)"
                                           ".*expected prompt embeddings") as info:
        load_prompt_embeds(path, TEXT_DIM)
    assert "\n" not in str(info.value)


def test_a_pickle_that_needs_code_is_refused_without_advice_to_load_it_unsafely(tmp_path):
    path = tmp_path / "embeds.pt"
    torch.save({EMBEDS_KEY: torch.zeros(1, 16, 64), "extra": __import__("fractions").Fraction(1, 3)}, path)
    with pytest.raises(HarnessError, match=r"contains Python objects \(fractions.Fraction\)") as info:
        load_prompt_embeds(path, TEXT_DIM)
    assert "weights_only" not in str(info.value) and "never runs pickled code" in str(info.value)
