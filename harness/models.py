"""Model sources: the embedded tiny models and local diffusers-layout directories.

``load_model(source)`` returns a ``LoadedModel``: the diffusers ``WanTransformer3DModel``,
what it was loaded from, a content fingerprint of its weights, its default probe geometry
and a prompt encoder. Nothing here touches the network.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel

from harness.errors import HarnessError

# The embedded tiny model: Wan's architecture (patch (1,2,2), q/k RMSNorm across heads, 3-D
# RoPE, cross-attention to text) at a size that extracts in seconds on a laptop CPU.
TINY_CONFIG: dict = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 64,
    "freq_dim": 64,
    "ffn_dim": 256,
    "num_layers": 4,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}
TINY_TEXT_TOKENS = 16
TINY_SEED = 0


@dataclass(frozen=True)
class Geometry:
    """Default probe geometry in pixel space (the VAE strides map it to latents)."""

    num_frames: int
    height: int
    width: int
    temporal_stride: int = 4
    spatial_stride: int = 8


TINY_GEOMETRY = Geometry(num_frames=33, height=64, width=64)
WAN_GEOMETRY = Geometry(num_frames=81, height=480, width=832)


@dataclass
class LoadedModel:
    """A transformer ready to sample, with what the dataset attrs need to say about it."""

    transformer: WanTransformer3DModel
    model_id: str
    checkpoint_path: str
    fingerprint: str
    geometry: Geometry
    encode_prompt: Callable[[str], torch.Tensor]
    prompt_encoder: str

    @property
    def config(self) -> dict:
        return {key: value for key, value in dict(self.transformer.config).items() if not key.startswith("_")}


def hash_prompt_embedding(prompt: str, text_tokens: int, text_dim: int) -> torch.Tensor:
    """Deterministic stand-in text embedding ``[1, tokens, dim]`` seeded by sha256(prompt).

    Used for models without a text encoder: the same prompt always gives the same vectors,
    different prompts give independent ones. It carries no meaning beyond identity.
    """
    seed = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "little")
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, text_tokens, text_dim, generator=generator)


def state_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over parameter names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def file_fingerprint(paths: list[Path]) -> str:
    """sha256 over the bytes of the weight files, in name order."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode() + b"|")
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def build_tiny_random() -> WanTransformer3DModel:
    """The embedded random-weight model: diffusers' own initialisation under a fixed seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = WanTransformer3DModel(**TINY_CONFIG)
    return model.eval()


def _tiny_encoder(prompt: str) -> torch.Tensor:
    return hash_prompt_embedding(prompt, TINY_TEXT_TOKENS, TINY_CONFIG["text_dim"])


def _load_tiny_random() -> LoadedModel:
    model = build_tiny_random()
    return LoadedModel(
        transformer=model,
        model_id="tiny-random",
        checkpoint_path="embedded:tiny-random",
        fingerprint=state_fingerprint(model),
        geometry=TINY_GEOMETRY,
        encode_prompt=_tiny_encoder,
        prompt_encoder="sha256-seeded random embedding (embedded model has no text encoder)",
    )


EMBEDDED: dict[str, Callable[[], LoadedModel]] = {"tiny-random": _load_tiny_random}


def _transformer_dir(path: Path) -> Path:
    """The directory holding the transformer's config.json, for a pipeline or transformer dir."""
    if (path / "model_index.json").is_file() and (path / "transformer" / "config.json").is_file():
        return path / "transformer"
    config = path / "config.json"
    if config.is_file():
        try:
            class_name = json.loads(config.read_text()).get("_class_name")
        except json.JSONDecodeError as err:
            raise HarnessError(f"{config}: not valid JSON ({err})") from err
        if class_name == "WanTransformer3DModel":
            return path
    found = sorted(p.name for p in path.iterdir())[:12] if path.is_dir() else []
    raise HarnessError(
        f"{path}: not a model this harness can load. Looked for a diffusers pipeline dir "
        f"(model_index.json + transformer/config.json) or a transformer dir (config.json with "
        f"_class_name WanTransformer3DModel); found {found or 'nothing'}"
    )


def _load_diffusers_dir(path: Path, dtype: torch.dtype) -> LoadedModel:
    directory = _transformer_dir(path)
    weights = sorted(directory.glob("*.safetensors"))
    if not weights:
        raise HarnessError(f"{directory}: no *.safetensors weights next to config.json")
    model = WanTransformer3DModel.from_pretrained(directory, torch_dtype=dtype, local_files_only=True).eval()
    text_dim = model.config.text_dim
    small = model.config.num_layers * model.config.num_attention_heads * model.config.attention_head_dim < 30 * 1536
    return LoadedModel(
        transformer=model,
        model_id=str(path.name),
        checkpoint_path=str(path.resolve()),
        fingerprint=_cached_file_fingerprint(tuple(weights)),
        geometry=TINY_GEOMETRY if small else WAN_GEOMETRY,
        encode_prompt=lambda prompt: hash_prompt_embedding(prompt, TINY_TEXT_TOKENS if small else 512, text_dim),
        prompt_encoder="sha256-seeded random embedding (no text encoder loaded)",
    )


@lru_cache(maxsize=32)
def _cached_file_fingerprint(paths: tuple[Path, ...]) -> str:
    return file_fingerprint(list(paths))


def cast_model(model: WanTransformer3DModel, dtype: torch.dtype) -> WanTransformer3DModel:
    """Cast to ``dtype`` except the modules diffusers keeps in float32 (RoPE, time embedder,
    modulation tables, norms), as ``from_pretrained(torch_dtype=...)`` does."""
    keep = set(model._keep_in_fp32_modules or [])
    for module_name, module in model.named_modules():
        tensors = [(key, module._parameters) for key in module._parameters] + [
            (key, module._buffers) for key in module._buffers
        ]
        for key, store in tensors:
            tensor = store[key]
            if tensor is None or not tensor.is_floating_point():
                continue
            if keep.intersection(f"{module_name}.{key}".split(".")):
                continue
            if isinstance(tensor, torch.nn.Parameter):
                tensor.data = tensor.data.to(dtype)
            else:
                store[key] = tensor.to(dtype)
    return model


def load_model(source: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> LoadedModel:
    """Load an embedded model by name or a local diffusers-layout directory."""
    if source in EMBEDDED:
        loaded = EMBEDDED[source]()
        cast_model(loaded.transformer, dtype)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise HarnessError(
                f"model {source!r}: no such embedded model ({', '.join(EMBEDDED)}) and no such path"
            )
        loaded = _load_diffusers_dir(path, dtype)
    loaded.transformer.to(device)
    return loaded


def model_fingerprint(source: str) -> str:
    """Content fingerprint of a model source's weights, as stored in dataset attrs."""
    if source in EMBEDDED:
        return _embedded_fingerprint(source)
    directory = _transformer_dir(Path(source).expanduser())
    return _cached_file_fingerprint(tuple(sorted(directory.glob("*.safetensors"))))


@lru_cache(maxsize=None)
def _embedded_fingerprint(name: str) -> str:
    return EMBEDDED[name]().fingerprint
