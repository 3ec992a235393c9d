"""Model sources: the embedded tiny models and checkpoints on disk in any of four layouts.

``load_model(source)`` returns a ``LoadedModel``: the diffusers ``WanTransformer3DModel``,
what it was loaded from, a content fingerprint of its weights, its default probe geometry
and a prompt encoder. Layout detection and key conversion live in ``attn_harness.model.layouts``;
nothing here touches the network.

Every loading path builds the model in float32 from its weights, then casts with
``cast_model``: the modules diffusers keeps in float32 (RoPE tables, time embedder,
modulation tables, norms) stay float32 whatever ``dtype`` says, as ``from_pretrained`` does.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import WanTransformer3DModel

from attn_harness.core import catalog
from attn_harness.core.catalog import FIXTURE_FOLDERS, FIXTURES, TINY_CONFIG, TINY_SEED, TINY_TEXT_TOKENS
from attn_harness.core.errors import HarnessError
from attn_harness.core.fingerprint import (  # noqa: F401  (re-exported: the model layer's callers)
    CACHE_ENV,
    FINGERPRINTS_FILE,
    cache_dir,
    file_sha256,
    files_fingerprint,
    sha256_chunks,
)
from attn_harness.model import layouts
from attn_harness.model.prompts import (
    ORIGINAL_T5_GLOB,
    ORIGINAL_TOKENIZER,
    HashPromptEncoder,
    MissingPromptEncoder,
    OriginalUMT5PromptEncoder,
    UMT5PromptEncoder,
    find_original_text_encoder,
    find_text_encoder,
)

# Widths -> heads for reading an architecture from tensor shapes: Wan2.1 plus the embedded models.
KNOWN_HEADS = {
    **layouts.KNOWN_HEADS,
    TINY_CONFIG["num_attention_heads"] * TINY_CONFIG["attention_head_dim"]: TINY_CONFIG["num_attention_heads"],
}


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
    """A transformer ready to sample, with what the dataset attrs need to say about it.

    ``encode_prompt`` maps a prompt to float32 ``[1, tokens, text_dim]``; for a model without a
    text encoder it raises a ``HarnessError`` telling the user to pass ``--prompt-embeds``.
    ``layout`` names the on-disk layout; ``architecture`` says where the config came from.
    """

    transformer: WanTransformer3DModel
    model_id: str
    checkpoint_path: str
    fingerprint: str
    geometry: Geometry
    encode_prompt: Callable[[str], torch.Tensor]
    prompt_encoder: str
    layout: str = "embedded"
    architecture: str = "embedded config"

    @property
    def config(self) -> dict:
        return {key: value for key, value in dict(self.transformer.config).items() if not key.startswith("_")}


def hash_prompt_embedding(prompt: str, text_tokens: int, text_dim: int) -> torch.Tensor:
    """Deterministic stand-in text embedding ``[1, tokens, dim]`` seeded by sha256(prompt).

    Used by the embedded models: the same prompt always gives the same vectors, different
    prompts give independent ones. It carries no meaning beyond identity.
    """
    return HashPromptEncoder(text_tokens, text_dim)(prompt)


def state_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over parameter names, dtypes, shapes and bytes, in name order."""
    def chunks():
        for name, tensor in sorted(model.state_dict().items()):
            data = tensor.detach().cpu().contiguous()
            yield f"{name}|{data.dtype}|{tuple(data.shape)}|".encode()
            yield data.view(torch.uint8).numpy().tobytes() if data.numel() else b""

    return sha256_chunks(chunks())


def build_tiny_random() -> WanTransformer3DModel:
    """The embedded random-weight model: diffusers' own initialisation under a fixed seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = WanTransformer3DModel(**TINY_CONFIG)
    return model.eval()


def _load_tiny_random() -> LoadedModel:
    model = build_tiny_random()
    encoder = HashPromptEncoder(TINY_TEXT_TOKENS, TINY_CONFIG["text_dim"])
    return LoadedModel(
        transformer=model,
        model_id="tiny-random",
        checkpoint_path="embedded:tiny-random",
        fingerprint=state_fingerprint(model),
        geometry=TINY_GEOMETRY,
        encode_prompt=encoder,
        prompt_encoder=encoder.description,
    )


def _load_fixture(name: str, folder: str) -> LoadedModel:
    """A trained tiny model shipped as package data in diffusers layout (attn_harness/fixtures/)."""
    from attn_harness.fixtures.videos import class_embedding

    layout = layouts.detect_layout(FIXTURES / folder)
    config_file = layout.config_dir / "config.json"
    state = layouts.to_diffusers_keys(layouts.read_weights(layout.weight_files), config_file)
    model = build_transformer(layouts.diffusers_config(layouts.read_json(config_file), config_file), state, layout.path)
    return LoadedModel(
        transformer=model,
        model_id=name,
        checkpoint_path=f"embedded:{name}",
        fingerprint=files_fingerprint(layout.weight_files),
        geometry=TINY_GEOMETRY,
        encode_prompt=class_embedding,
        prompt_encoder="class embedding of the prompt's colour/shape/direction/speed words "
        "(attn_harness.fixtures.videos); other prompts: sha256-seeded random embedding",
        architecture=f"{config_file.relative_to(FIXTURES.parent)}",
    )


EMBEDDED: dict[str, Callable[[], LoadedModel]] = {
    "tiny-random": _load_tiny_random,
    **{name: partial(_load_fixture, name, folder) for name, folder in FIXTURE_FOLDERS.items()},
}


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


def build_transformer(config: dict, state: dict[str, torch.Tensor], where: Path) -> WanTransformer3DModel:
    """A float32 ``WanTransformer3DModel`` holding exactly ``state`` (diffusers keys, strict).

    Parameters are created empty (no random init of billions of weights) and assigned; the
    RoPE buffers are computed as usual. ``state`` is consumed: each tensor is moved into fresh
    storage (``_fresh_float32``) and dropped from the dict.
    """
    with init_empty_weights(include_buffers=False):
        model = WanTransformer3DModel(**config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise HarnessError(
            f"{where}: weights do not fit the architecture {_arch(config)}: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    own = model.state_dict()
    wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if v.shape != own[k].shape]
    if wrong:
        key, got, want = wrong[0]
        raise HarnessError(
            f"{where}: {len(wrong)} weight(s) have the wrong shape for {_arch(config)}, e.g. {key} is {got}, expected {want}"
        )
    fresh = {key: _fresh_float32(state.pop(key)) for key in list(state)}
    model.load_state_dict(fresh, strict=True, assign=True)
    return model.eval()


def _fresh_float32(tensor: torch.Tensor) -> torch.Tensor:
    """A float32 contiguous copy in storage from PyTorch's allocator, as an in-process model has.

    Tensors read from safetensors are not 64-byte aligned, and MKL's sgemm rounds differently
    for unaligned operands on its non-AVX-512 code paths (AMD CPUs; ``MKL_ENABLE_INSTRUCTIONS=SSE4_2``
    on Intel: 6e-7 in the output of the tiny model), so a loaded model was bitwise equal to the
    in-process one only on AVX-512 hosts.
    """
    return torch.empty(tensor.shape, dtype=torch.float32).copy_(tensor)


def _arch(config: dict) -> str:
    return (
        f"({config['num_layers']} layers, {config['num_attention_heads']} heads x {config['attention_head_dim']}, "
        f"ffn {config['ffn_dim']}, text {config['text_dim']})"
    )


def _architecture_of_dir(layout: layouts.Layout, state: dict[str, torch.Tensor] | None) -> dict:
    """Diffusers config of a dir layout; an original config's missing widths come from ``state``."""
    config_file = layout.config_dir / "config.json"
    raw = layouts.read_json(config_file)
    if layout.kind == "wan-original":
        if state is None:
            state = layouts.to_diffusers_keys(layouts.read_weights(layout.weight_files), config_file)
        return layouts.wan_config_to_diffusers(raw, state, config_file)
    return layouts.diffusers_config(raw, config_file)


def _small(config: dict) -> bool:
    return config["num_layers"] * config["num_attention_heads"] * config["attention_head_dim"] < 30 * 1536


def _prompt_encoder(layout: layouts.Layout | None, device: str | torch.device, small: bool):
    """The umT5 encoder beside a dir layout's transformer (diffusers ``text_encoder/``, or the original
    release's ``models_t5_*.pth`` + ``google/umt5-xxl/``), else one that asks for --prompt-embeds."""
    if layout is None:
        return MissingPromptEncoder("a checkpoint file without --base-model")
    on_disk = layout.path.is_dir()
    for find, encoder_class in ((find_text_encoder, UMT5PromptEncoder), (find_original_text_encoder, OriginalUMT5PromptEncoder)):
        found = find(layout.path) if on_disk else None
        if found is not None:
            encoder, tokenizer_dir = found
            weights = (*sorted(encoder.glob("*.safetensors")),) if encoder.is_dir() else (encoder,)
            files = weights + tuple(sorted(p for p in tokenizer_dir.iterdir() if p.is_file()))
            return encoder_class(
                encoder,
                tokenizer_dir,
                partial(files_fingerprint, files),
                cache_dir(),
                text_tokens=_text_tokens(layout, small),
                device=device,
            )
    original = sorted(layout.path.glob(ORIGINAL_T5_GLOB)) if on_disk else []
    found = f"{original[0].name} but no {ORIGINAL_TOKENIZER}/ tokenizer folder beside it" if original else ""
    return MissingPromptEncoder(str(layout.path), found)


def _load_path(path: Path, base_model: Path | None, device: str | torch.device) -> LoadedModel:
    layout = layouts.detect_layout(path)
    if base_model is not None and layout.kind != "training-checkpoint":
        raise HarnessError(f"--base-model only applies to a training checkpoint file; {path} is a {layout.kind} dir")
    text_layout: layouts.Layout | None = layout
    if layout.kind == "training-checkpoint":
        raw, entry = layouts.select_generator(layouts.load_checkpoint_file(path), path)
        state = layouts.to_diffusers_keys(raw, path)
        if base_model is not None:
            base = layouts.detect_layout(base_model)
            if base.kind == "training-checkpoint":
                raise HarnessError(
                    f"--base-model {base_model}: must be a model dir (diffusers or original Wan), not a checkpoint file"
                )
            config = _architecture_of_dir(base, state if base.kind == "wan-original" else None)
            architecture = f"{base.kind} config of {base.path}"
            text_layout = base
        else:
            config = layouts.infer_config(state, path, KNOWN_HEADS)
            architecture = "inferred from tensor shapes (eps 1e-6, RoPE length 1024 assumed)"
            text_layout = None
        checkpoint = f"{path.resolve()}#{entry}" if entry else str(path.resolve())
    else:
        state = layouts.to_diffusers_keys(layouts.read_weights(layout.weight_files), layout.config_dir)
        config = _architecture_of_dir(layout, state)
        architecture = f"{layout.kind} config.json"
        checkpoint = str(path.resolve())
    model = build_transformer(config, state, path)
    small = _small(config)
    encoder = _prompt_encoder(text_layout, device, small)
    return LoadedModel(
        transformer=model,
        model_id=path.stem if path.is_file() else path.name,
        checkpoint_path=checkpoint,
        fingerprint=files_fingerprint(layout.weight_files),
        geometry=TINY_GEOMETRY if small else WAN_GEOMETRY,
        encode_prompt=encoder,
        prompt_encoder=encoder.description,
        layout=layout.kind,
        architecture=architecture,
    )


def _text_tokens(layout: layouts.Layout, small: bool) -> int:
    """Text tokens the encoder pads to: the original config's ``text_len``, else Wan's 512."""
    if layout.kind == "wan-original":
        return int(layouts.read_json(layout.config_dir / "config.json").get("text_len", 512))
    return TINY_TEXT_TOKENS if small else 512


def load_model(
    source: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    base_model: str | Path | None = None,
) -> LoadedModel:
    """Load an embedded model by name, or a model on disk in any layout ``attn_harness.model.layouts`` knows.

    ``base_model`` (a model dir) supplies the architecture and text encoder of a training
    checkpoint file; without it the architecture is read from the tensor shapes.
    """
    if str(source) in EMBEDDED:
        if base_model is not None:
            raise HarnessError(f"--base-model only applies to a training checkpoint file, not the embedded {source!r}")
        loaded = EMBEDDED[str(source)]()
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise HarnessError(f"model {str(source)!r}: no such embedded model ({', '.join(EMBEDDED)}) and no such path")
        loaded = _load_path(path, Path(base_model).expanduser() if base_model is not None else None, device)
    cast_model(loaded.transformer, dtype)
    loaded.transformer.to(device)
    return loaded


def model_fingerprint(source: str | Path) -> str:
    """Content fingerprint of a model source's weights, as stored in dataset attrs (cached on disk)."""
    if str(source) in EMBEDDED:
        return _embedded_fingerprint(str(source))
    return files_fingerprint(layouts.detect_layout(source).weight_files)


@lru_cache(maxsize=None)
def _embedded_fingerprint(name: str) -> str:
    return EMBEDDED[name]().fingerprint


def num_layers(source: str | Path) -> int:
    """How many transformer blocks a model source has, read from its config without building it.

    A training checkpoint file has no config: its block count is read from its weight names.
    """
    known = catalog.num_layers(source)
    if known is not None:
        return known
    layout = layouts.detect_layout(source)
    raw, _ = layouts.select_generator(layouts.load_checkpoint_file(layout.path), layout.path)
    blocks = {int(match[1]) for key in raw if (match := re.search(r"(?:^|\.)blocks\.(\d+)\.", key))}
    if not blocks:
        raise HarnessError(f"{layout.path}: no blocks.N.* weights, so the layer count is unknown")
    return max(blocks) + 1
