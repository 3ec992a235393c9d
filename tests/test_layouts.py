"""Every on-disk layout loads offline into the model that was saved, bit for bit.

The embedded tiny-random model is written in each layout a user points the harness at
(diffusers pipeline dir, bare transformer dir, the original Wan release with single or
sharded weights, a trainer's .pt/.safetensors checkpoint); original key names are produced
by ``to_original``, an inverse of diffusers' conversion checked to round-trip exactly.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from attn_harness.core.errors import HarnessError
from attn_harness.model import layouts
from attn_harness.model.models import TINY_CONFIG, build_tiny_random, load_model

pytestmark = pytest.mark.numerics  # bitwise/tolerance claims: CI reruns them under forced CPU ISAs

# diffusers name -> original Wan name, applied in order (the inverse of diffusers' rename table).
_TO_ORIGINAL = (
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn1", "self_attn"),
    ("attn2", "cross_attn"),
    (".to_out.0.", ".o."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
    ("proj_out", "head.head"),
)


def to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Diffusers keys -> the original release's (norm2/norm3 swapped, modulation tables renamed)."""
    out = {}
    for key, value in state.items():
        new = key
        for diffusers_name, original_name in _TO_ORIGINAL:
            new = new.replace(diffusers_name, original_name)
        new = re.sub(r"\.norm([23])\.", lambda m: ".norm" + {"2": "3", "3": "2"}[m.group(1)] + ".", new)
        new = "head.modulation" if new == "scale_shift_table" else new.replace(".scale_shift_table", ".modulation")
        out[new] = value
    return out


def original_config(config: dict) -> dict:
    """The original release's config.json for a diffusers config (no text_dim: it is not there)."""
    return {
        "_class_name": "WanModel",
        "_diffusers_version": "0.30.0",
        "model_type": "t2v",
        "dim": config["num_attention_heads"] * config["attention_head_dim"],
        "ffn_dim": config["ffn_dim"],
        "freq_dim": config["freq_dim"],
        "num_heads": config["num_attention_heads"],
        "num_layers": config["num_layers"],
        "in_dim": config["in_channels"],
        "out_dim": config["out_channels"],
        "text_len": 512,
        "eps": config["eps"],
        "patch_size": list(config["patch_size"]),
        "window_size": [-1, -1],
        "qk_norm": True,
        "cross_attn_norm": True,
    }


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTN_HARNESS_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def reference():
    return build_tiny_random()


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(1, 16, 3, 8, 8, generator=generator),
        "timestep": torch.tensor([700.0]),
        "encoder_hidden_states": torch.randn(1, 16, TINY_CONFIG["text_dim"], generator=generator),
    }


def _output(model, inputs) -> torch.Tensor:
    with torch.inference_mode():
        return model(**inputs, return_dict=False)[0]


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def write_original_dir(model, directory, shards: int = 1):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(original_config(dict(model.config))))
    state = to_original(_state(model))
    if shards == 1:
        save_file(state, directory / layouts.WEIGHTS_NAME)
        return directory
    keys = sorted(state)
    weight_map = {}
    for index in range(shards):
        name = f"diffusion_pytorch_model-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[index::shards]
        save_file({k: state[k] for k in part}, directory / name)
        weight_map.update({k: name for k in part})
    (directory / f"{layouts.WEIGHTS_NAME}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def test_inverse_key_mapping_round_trips_through_diffusers_conversion(reference):
    state = _state(reference)
    original = to_original(state)
    assert "blocks.0.self_attn.q.weight" in original and "head.head.weight" in original
    assert "blocks.0.norm3.weight" in original and "blocks.0.modulation" in original and "head.modulation" in original
    back = layouts.original_to_diffusers(original)
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_diffusers_pipeline_dir_loads_bitwise_equal(tmp_path, reference, inputs):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    reference.save_pretrained(tmp_path / "transformer")
    loaded = load_model(tmp_path)
    assert loaded.layout == "diffusers-pipeline"
    assert torch.equal(_output(loaded.transformer, inputs), _output(reference, inputs))


def test_bare_transformer_dir_loads_bitwise_equal(tmp_path, reference, inputs):
    reference.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.layout == "diffusers-transformer"
    assert torch.equal(_output(loaded.transformer, inputs), _output(reference, inputs))


@pytest.mark.parametrize("shards", [1, 3])
def test_original_wan_dir_loads_bitwise_equal_with_text_dim_from_shapes(tmp_path, reference, inputs, shards):
    write_original_dir(reference, tmp_path / "wan", shards)
    loaded = load_model(tmp_path / "wan")
    assert loaded.layout == "wan-original"
    assert loaded.config["text_dim"] == TINY_CONFIG["text_dim"] != 4096  # diffusers' default would be 4096
    assert torch.equal(_output(loaded.transformer, inputs), _output(reference, inputs))


def _perturbed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}


def test_training_checkpoint_prefers_ema_strips_model_prefix_and_infers_architecture(tmp_path, reference, inputs):
    ema = {f"model.{k}": v for k, v in to_original(_state(reference)).items()}
    plain = {f"model.{k}": v for k, v in to_original(_perturbed(_state(reference))).items()}
    torch.save({"generator": plain, "generator_ema": ema, "step": torch.tensor(100)}, tmp_path / "checkpoint.pt")
    loaded = load_model(tmp_path / "checkpoint.pt")
    assert loaded.layout == "training-checkpoint"
    assert loaded.checkpoint_path.endswith("checkpoint.pt#generator_ema")
    assert "inferred" in loaded.architecture
    assert {k: loaded.config[k] for k in TINY_CONFIG if k != "rope_max_seq_len"} == {
        k: (tuple(v) if isinstance(v, tuple) else v) for k, v in TINY_CONFIG.items() if k != "rope_max_seq_len"
    }
    assert torch.equal(_output(loaded.transformer, inputs), _output(reference, inputs))


def test_training_checkpoint_without_ema_uses_generator(tmp_path, reference, inputs):
    torch.save({"generator": to_original(_state(reference))}, tmp_path / "checkpoint.pt")
    loaded = load_model(tmp_path / "checkpoint.pt")
    assert loaded.checkpoint_path.endswith("#generator")
    assert torch.equal(_output(loaded.transformer, inputs), _output(reference, inputs))


def test_training_checkpoint_takes_architecture_from_base_model(tmp_path, reference, inputs):
    write_original_dir(reference, tmp_path / "base")
    flat = {f"generator_ema.model.{k}": v for k, v in to_original(_state(reference)).items()}
    save_file(flat, tmp_path / "checkpoint.safetensors")
    loaded = load_model(tmp_path / "checkpoint.safetensors", base_model=tmp_path / "base")
    assert loaded.architecture.startswith("wan-original config of")
    assert torch.equal(_output(loaded.transformer, inputs), _output(reference, inputs))


def test_base_model_that_disagrees_with_the_checkpoint_is_one_clear_error(tmp_path, reference):
    config = dict(reference.config)
    write_original_dir(reference, tmp_path / "base")
    wrong = original_config(config) | {"num_layers": 2}
    (tmp_path / "base" / "config.json").write_text(json.dumps(wrong))
    torch.save({"generator": to_original(_state(reference))}, tmp_path / "checkpoint.pt")
    with pytest.raises(HarnessError, match=r"checkpoint\.pt: weights do not fit the architecture \(2 layers.*unexpected"):
        load_model(tmp_path / "checkpoint.pt", base_model=tmp_path / "base")


def test_bfloat16_load_keeps_the_modules_diffusers_keeps_in_float32(tmp_path, reference):
    from diffusers import WanTransformer3DModel

    reference.save_pretrained(tmp_path / "diffusers")
    write_original_dir(reference, tmp_path / "wan")
    expected = WanTransformer3DModel.from_pretrained(tmp_path / "diffusers", torch_dtype=torch.bfloat16)
    want = {name: t.dtype for name, t in expected.state_dict().items()}
    assert {torch.float32, torch.bfloat16} <= set(want.values())
    for source in (tmp_path / "wan", tmp_path / "diffusers"):
        model = load_model(source, dtype=torch.bfloat16).transformer
        assert {name: t.dtype for name, t in model.state_dict().items()} == want
        assert model.rope.freqs_cos.dtype == expected.rope.freqs_cos.dtype
        assert all(torch.equal(t, expected.state_dict()[name]) for name, t in model.state_dict().items())


@pytest.mark.parametrize(
    "make, found",
    [
        (lambda d: None, "an empty dir"),
        (lambda d: (d / "notes.txt").write_text("hi"), "notes.txt"),
        (lambda d: (d / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"})), "_class_name 'UNet2DModel'"),
        (lambda d: (d / "config.json").write_text(json.dumps({"_class_name": "WanModel"})), "no \\*.safetensors weights"),
    ],
    ids=["empty", "unrelated-file", "other-class", "config-without-weights"],
)
def test_unloadable_dirs_give_one_error_listing_the_layouts_looked_for(tmp_path, make, found):
    make(tmp_path)
    with pytest.raises(HarnessError) as info:
        load_model(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and re.search(found, message)
    for layout in ("diffusers pipeline dir", "diffusers transformer dir", "original Wan dir", "training checkpoint file"):
        assert layout in message


def test_checkpoint_without_generator_weights_names_the_entries_it_found(tmp_path):
    torch.save({"optimizer": {"lr": 0.1}, "step": 3}, tmp_path / "ckpt.pt")
    with pytest.raises(HarnessError, match=r"ckpt\.pt: no generator weights.*\['optimizer', 'step'\]"):
        load_model(tmp_path / "ckpt.pt")


def test_invalid_config_json_names_file_and_line(tmp_path):
    (tmp_path / "config.json").write_text('{\n  "_class_name": "WanModel",\n  oops\n}')
    with pytest.raises(HarnessError, match=r"config\.json:3: not valid JSON"):
        load_model(tmp_path)


def test_unknown_head_count_asks_for_base_model(tmp_path):
    state = {"patch_embedding.weight": torch.zeros(100, 16, 1, 2, 2)}
    with pytest.raises(HarnessError, match="hidden width 100 .* pass --base-model DIR"):
        layouts.infer_config(state, tmp_path / "x.pt")


def test_loaded_weights_have_the_memory_layout_of_an_in_process_model(tmp_path, reference):
    """What makes the bitwise claims above hold on every CPU: MKL's non-AVX-512 sgemm (AMD hosts,
    ``MKL_ENABLE_INSTRUCTIONS=SSE4_2`` on Intel) rounds differently for operands that are not
    64-byte aligned, and safetensors hands out unaligned tensors; the loader copies them."""
    reference.save_pretrained(tmp_path)
    loaded = load_model(tmp_path).transformer
    for name, param in [*reference.named_parameters(), *loaded.named_parameters()]:
        assert param.is_contiguous() and param.data_ptr() % 64 == 0, name
        assert param.untyped_storage().nbytes() == param.numel() * param.element_size(), name
