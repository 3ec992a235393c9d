"""Text conditioning: prompt embedding files, the umT5 text encoder, and their disk cache.

A Wan transformer is conditioned on umT5-XXL embeddings ``[1, tokens, text_dim]``. They come
from, in order of precedence:

1. ``--prompt-embeds FILE``: a ``.pt`` holding a tensor ``[1, tokens, text_dim]`` or a dict with
   ``prompt_embeds`` (and optionally ``negative_prompt_embeds``), or a ``.safetensors`` with those keys;
2. the text encoder in the checkpoint dir (diffusers ``text_encoder/`` + ``tokenizer/``, or the
   original release's ``models_t5_*.pth`` + ``google/umt5-xxl/``, converted on load), run
   with ``transformers`` (the optional extra ``[text]``) and cached on disk keyed by prompt +
   encoder fingerprint, so the 11 GB encoder loads once per prompt, not once per run;
3. the embedded models' hash-seeded stand-in embedding.

Anything else is a clear error naming what to pass.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from attn_harness.core.atomic import atomic_path
from attn_harness.core.errors import HarnessError
from attn_harness.core.fingerprint import seed_of_text, sha256_chunks, sha256_text
from attn_harness.model.torchfile import load_tensors

EMBEDS_KEY = "prompt_embeds"
NEGATIVE_KEY = "negative_prompt_embeds"
WAN_TEXT_TOKENS = 512
TEXT_EXTRA = "pip install 'attn-harness[text]' (adds transformers)"
ORIGINAL_T5_GLOB = "models_t5_*.pth"  # the original release's umT5 weights (Wan's own T5 module names)
ORIGINAL_TOKENIZER = "google/umt5-xxl"  # its tokenizer folder, as Wan's configs name it (t5_tokenizer)


def embedding_fingerprint(tensor: torch.Tensor) -> str:
    """sha256 of an embedding's float32 bytes (what dataset attrs record)."""
    return sha256_chunks([tensor.detach().float().cpu().contiguous().numpy().tobytes()])


@dataclass(frozen=True)
class PromptEmbeds:
    """Embeddings read from a file: the prompt's, and the negative prompt's when the file has them."""

    prompt: torch.Tensor
    negative: torch.Tensor | None
    path: str


def _check_embedding(tensor: object, where: str, text_dim: int | None) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or tensor.ndim != 3 or tensor.shape[0] != 1 or not tensor.is_floating_point():
        got = (f"a {str(tensor.dtype).replace('torch.', '')} tensor of shape {list(tensor.shape)}"
               if isinstance(tensor, torch.Tensor) else type(tensor).__name__)
        raise HarnessError(f"{where}: expected a float tensor [1, tokens, text_dim]; got {got}")
    if text_dim is not None and tensor.shape[2] != text_dim:
        raise HarnessError(f"{where}: text width {tensor.shape[2]} does not match the model's text_dim {text_dim}")
    return tensor.detach().float().cpu()


def load_prompt_embeds(path: str | Path, text_dim: int | None = None) -> PromptEmbeds:
    """Read a ``--prompt-embeds`` file (``.pt`` tensor or dict, or ``.safetensors`` with named keys)."""
    path = Path(path).expanduser()
    if not path.is_file():
        state = "is a directory, not a prompt embeddings file" if path.is_dir() else "prompt embeddings file not found"
        raise HarnessError(f"{path}: {state}")
    content = load_tensors(path, what="prompt embeddings (a tensor or a dict of tensors)")
    if isinstance(content, torch.Tensor):
        return PromptEmbeds(_check_embedding(content, str(path), text_dim), None, str(path))
    if not isinstance(content, dict) or EMBEDS_KEY not in content:
        found = sorted(map(str, content)) if isinstance(content, dict) else type(content).__name__
        raise HarnessError(
            f"{path}: expected a tensor [1, tokens, text_dim] or a dict with {EMBEDS_KEY!r} "
            f"(and optionally {NEGATIVE_KEY!r}); found {found}"
        )
    prompt = _check_embedding(content[EMBEDS_KEY], f"{path} [{EMBEDS_KEY}]", text_dim)
    negative = content.get(NEGATIVE_KEY)
    if negative is not None:
        negative = _check_embedding(negative, f"{path} [{NEGATIVE_KEY}]", text_dim)
    return PromptEmbeds(prompt, negative, str(path))


def save_prompt_embeds(path: str | Path, prompt: torch.Tensor, negative: torch.Tensor | None = None) -> Path:
    """Write embeddings in the ``.safetensors`` form ``load_prompt_embeds`` reads, atomically."""
    path = Path(path)
    tensors = {EMBEDS_KEY: prompt.detach().float().cpu().contiguous()}
    if negative is not None:
        tensors[NEGATIVE_KEY] = negative.detach().float().cpu().contiguous()
    _atomic_save(tensors, path)
    return path


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    with atomic_path(path) as temp:
        save_file(tensors, temp)


class HashPromptEncoder:
    """The embedded models' stand-in: ``[1, tokens, dim]`` normal vectors seeded by sha256(prompt)."""

    def __init__(self, text_tokens: int, text_dim: int) -> None:
        self.text_tokens, self.text_dim = text_tokens, text_dim
        self.description = "sha256-seeded random embedding (embedded model has no text encoder)"

    def __call__(self, prompt: str) -> torch.Tensor:
        seed = seed_of_text(prompt)
        return torch.randn(1, self.text_tokens, self.text_dim, generator=torch.Generator().manual_seed(seed))


class MissingPromptEncoder:
    """Stands in for a model dir without a text encoder: any prompt is an error saying what to pass."""

    description = "none"

    def __init__(self, where: str, found: str = "") -> None:
        self.where, self.found = where, found  # found: what was there instead, as a phrase

    def __call__(self, prompt: str) -> torch.Tensor:
        found = f"; found {self.found}" if self.found else ""
        raise HarnessError(
            f"{self.where}: no text encoder found (looked for text_encoder/ + tokenizer/, or {ORIGINAL_T5_GLOB} + "
            f"{ORIGINAL_TOKENIZER}/, beside the transformer{found}), "
            "so prompt text cannot be encoded; pass --prompt-embeds FILE (a .pt tensor [1, tokens, text_dim] or a "
            f"dict/safetensors with {EMBEDS_KEY!r} and {NEGATIVE_KEY!r})"
        )


def clean_prompt(prompt: str) -> str:
    """Wan's prompt cleaning: HTML entities unescaped, whitespace runs collapsed (ftfy when installed)."""
    try:
        import ftfy

        prompt = ftfy.fix_text(prompt)
    except ImportError:
        pass
    prompt = html.unescape(html.unescape(prompt))
    return re.sub(r"\s+", " ", prompt).strip()


class UMT5PromptEncoder:
    """umT5 encoder (a diffusers ``text_encoder/`` dir), loaded on first use; embeddings cached on disk.

    Encoding follows diffusers' Wan pipeline: tokens padded to ``text_tokens``, the encoder's last
    hidden state kept for the real tokens and zero beyond them.
    """

    def __init__(
        self,
        encoder_dir: Path,
        tokenizer_dir: Path,
        fingerprint: Callable[[], str],
        cache_dir: Path,
        *,
        text_tokens: int = WAN_TEXT_TOKENS,
        device: str | torch.device = "cpu",
    ) -> None:
        self.encoder_dir, self.tokenizer_dir = encoder_dir, tokenizer_dir
        self._fingerprint_of = fingerprint
        self._fingerprint: str | None = None
        self.cache_dir = cache_dir / "prompt-embeds"
        self.text_tokens = text_tokens
        self.device = torch.device(device)
        self.description = f"umT5 encoder {encoder_dir} (tokenizer {tokenizer_dir.name}/, {text_tokens} tokens)"
        self.calls = 0  # encoder runs (cache misses), for tests and progress messages

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = self._fingerprint_of()
        return self._fingerprint

    def cache_path(self, prompt: str) -> Path:
        key = sha256_text(f"{self.fingerprint}\0{self.text_tokens}\0{prompt}")
        return self.cache_dir / f"{key}.safetensors"

    def __call__(self, prompt: str) -> torch.Tensor:
        path = self.cache_path(prompt)
        if path.is_file():
            return load_file(path)[EMBEDS_KEY]
        embedding = self.encode(prompt)
        _atomic_save({EMBEDS_KEY: embedding.contiguous()}, path)
        return embedding

    def encode(self, prompt: str) -> torch.Tensor:
        """Run the encoder (no cache): float32 ``[1, text_tokens, hidden]``."""
        try:
            from transformers import AutoTokenizer
        except ImportError as err:
            raise HarnessError(f"{self.encoder_dir}: encoding prompts needs transformers: {TEXT_EXTRA}") from err
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32  # umT5 overflows in float16
        _, tokens = self._tokenize(AutoTokenizer, prompt)
        encoder = self.load_encoder(dtype).to(self.device).eval()
        with torch.inference_mode():
            hidden = encoder(tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)).last_hidden_state
        length = int(tokens.attention_mask.gt(0).sum())
        embedding = torch.zeros(1, self.text_tokens, hidden.shape[-1])
        embedding[:, :length] = hidden[:, :length].float().cpu()
        self.calls += 1
        return embedding

    def _tokenize(self, tokenizer_class, prompt: str):
        """(tokenizer, ids and attention mask padded to ``text_tokens``), as diffusers' Wan pipeline tokenizes."""
        tokenizer = tokenizer_class.from_pretrained(self.tokenizer_dir, local_files_only=True)
        return tokenizer, tokenizer(
            clean_prompt(prompt),
            padding="max_length",
            max_length=self.text_tokens,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )

    def token_strings(self, prompt: str) -> list[str]:
        """The ``text_tokens`` token strings the encoder sees for ``prompt`` (padding included)."""
        from transformers import AutoTokenizer

        tokenizer, tokens = self._tokenize(AutoTokenizer, prompt)
        return [str(token) for token in tokenizer.convert_ids_to_tokens(tokens.input_ids[0].tolist())]

    def load_encoder(self, dtype: torch.dtype):
        """The transformers ``UMT5EncoderModel`` of a diffusers ``text_encoder/`` dir."""
        from transformers import UMT5EncoderModel

        return UMT5EncoderModel.from_pretrained(self.encoder_dir, dtype=dtype, local_files_only=True)


class OriginalUMT5PromptEncoder(UMT5PromptEncoder):
    """The original release's ``models_t5_*.pth`` (Wan's own T5 names), converted to transformers'
    umT5 on load and otherwise encoded and cached exactly as a pipeline dir's encoder."""

    def __init__(self, weights: Path, tokenizer_dir: Path, fingerprint: Callable[[], str], cache_dir: Path, **kwargs) -> None:
        super().__init__(weights, tokenizer_dir, fingerprint, cache_dir, **kwargs)
        self.description = (
            f"umT5 encoder {weights} (Wan T5 keys converted; tokenizer {tokenizer_dir.name}/, {self.text_tokens} tokens)"
        )

    def load_encoder(self, dtype: torch.dtype):
        """Wan's T5 state dict as a ``UMT5EncoderModel`` (see ``attn_harness.model.umt5``)."""
        from attn_harness.model.umt5 import load_original_umt5

        return load_original_umt5(self.encoder_dir, dtype)


def find_text_encoder(root: Path) -> tuple[Path, Path] | None:
    """``(text_encoder dir, tokenizer dir)`` of a diffusers pipeline dir, or None."""
    encoder, tokenizer = root / "text_encoder", root / "tokenizer"
    if (encoder / "config.json").is_file() and tokenizer.is_dir():
        return encoder, tokenizer
    return None


def find_original_text_encoder(root: Path) -> tuple[Path, Path] | None:
    """``(models_t5_*.pth, google/umt5-xxl dir)`` of an original Wan release dir, or None."""
    weights, tokenizer = sorted(root.glob(ORIGINAL_T5_GLOB)), root / ORIGINAL_TOKENIZER
    if weights and tokenizer.is_dir():
        return weights[0], tokenizer
    return None


@dataclass(frozen=True)
class Conditioning:
    """The text embeddings one run uses (float32, CPU) and where they came from."""

    prompt: torch.Tensor
    negative: torch.Tensor | None
    encoder: str
    embeds_file: str = ""

    def attrs(self) -> dict[str, str]:
        """What dataset attrs record about the conditioning."""
        return {
            "prompt_encoder": self.encoder,
            "prompt_embedding_fingerprint": embedding_fingerprint(self.prompt),
            "negative_prompt_embedding_fingerprint": "" if self.negative is None else embedding_fingerprint(self.negative),
            "prompt_embeds_file": self.embeds_file,
        }


def resolve_conditioning(
    encode_prompt: Callable[[str], torch.Tensor],
    encoder_description: str,
    *,
    prompt: str,
    negative_prompt: str,
    prompt_embeds: str | Path | None,
    text_dim: int,
    use_cfg: bool,
) -> Conditioning:
    """Embeddings for a run: a ``prompt_embeds`` file wins over the encoder; the negative prompt
    (only with CFG) comes from the file's ``negative_prompt_embeds``, else from the encoder."""
    if prompt_embeds is None:
        cond = _check_embedding(encode_prompt(prompt), "text encoder output", text_dim)
        negative = _check_embedding(encode_prompt(negative_prompt), "text encoder output", text_dim) if use_cfg else None
        return Conditioning(cond, negative, encoder_description)
    embeds = load_prompt_embeds(prompt_embeds, text_dim)
    negative = embeds.negative if use_cfg else None
    if use_cfg and negative is None:
        if isinstance(encode_prompt, MissingPromptEncoder):
            raise HarnessError(
                f"{embeds.path}: holds no {NEGATIVE_KEY!r} and the model has no text encoder for the negative prompt; "
                "add negative_prompt_embeds to the file, or set guidance to 1 (no CFG)"
            )
        negative = _check_embedding(encode_prompt(negative_prompt), "text encoder output", text_dim)
    return Conditioning(embeds.prompt, negative, f"prompt embeddings file {embeds.path}", embeds.path)
