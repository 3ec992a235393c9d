"""Checkpoint layouts on disk -> (diffusers config, diffusers-keyed state dict), offline.

Four layouts are recognised (docs/design.md, "Model sources"):

* ``diffusers-pipeline``: ``model_index.json`` + ``transformer/`` (a diffusers pipeline dir);
* ``diffusers-transformer``: ``config.json`` with ``_class_name: WanTransformer3DModel``;
* ``wan-original``: ``config.json`` with ``_class_name: WanModel`` (the official release) and
  ``diffusion_pytorch_model.safetensors``, or shards named by ``*.safetensors.index.json``;
* ``training-checkpoint``: one ``.pt``/``.pth``/``.ckpt``/``.safetensors`` file as written by
  the autoregressive trainers (``generator_ema`` preferred over ``generator``, keys possibly
  prefixed ``model.``, original key names), its architecture from a base-model dir or from
  the tensor shapes.

Original key names are converted with diffusers' own ``convert_wan_transformer_to_diffusers``;
whatever an original config leaves out (the text width, for one) is read from tensor shapes.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

from attn_harness.core.errors import HarnessError
from attn_harness.core.layout import (  # noqa: F401  (re-exported: the model layer's callers)
    CHECKPOINT_SUFFIXES,
    WEIGHTS_NAME,
    Layout,
    detect_layout,
    read_json,
)
from attn_harness.model.torchfile import load_tensors

# Trainer checkpoints: the EMA generator is what one samples from, so it wins when present.
GENERATOR_ENTRIES = ("generator_ema", "generator")
# Wrapper prefixes trainers put in front of the model's own parameter names.
KEY_PREFIXES = ("module.", "_orig_mod.", "model.")
# Heads cannot be read from tensor shapes (q/k RMSNorm spans all heads). Known widths first,
# then the Wan family's head dim of 128.
KNOWN_HEADS = {1536: 12, 5120: 40}
WAN_HEAD_DIM = 128


def _init_keys() -> set[str]:
    return set(inspect.signature(WanTransformer3DModel.__init__).parameters) - {"self"}


def diffusers_config(config: Mapping, where: Path) -> dict:
    """A diffusers transformer config.json reduced to ``WanTransformer3DModel`` arguments."""
    known = _init_keys()
    unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
    if unknown:
        raise HarnessError(f"{where}: unknown WanTransformer3DModel config key(s) {unknown}")
    return {k: v for k, v in config.items() if k in known}


def wan_config_to_diffusers(config: Mapping, state: Mapping[str, torch.Tensor], where: Path) -> dict:
    """Translate an original Wan ``config.json`` to diffusers' arguments; widths it omits come from ``state``.

    ``state`` is diffusers-keyed. Only text-to-video models with global attention are accepted.
    """
    required = ("dim", "ffn_dim", "freq_dim", "num_heads", "num_layers", "in_dim", "out_dim", "eps")
    missing = [k for k in required if k not in config]
    if missing:
        raise HarnessError(f"{where}: original Wan config lacks {missing}; it needs {list(required)}")
    if config.get("model_type", "t2v") != "t2v":
        raise HarnessError(f"{where}: model_type {config['model_type']!r} is not supported; only t2v (text-to-video) models")
    if tuple(config.get("window_size", (-1, -1))) != (-1, -1):
        raise HarnessError(f"{where}: window_size {config['window_size']} (local attention) is not supported; only (-1, -1)")
    dim, heads = int(config["dim"]), int(config["num_heads"])
    if dim % heads:
        raise HarnessError(f"{where}: dim {dim} is not divisible by num_heads {heads}")
    text = _shape(state, "condition_embedder.text_embedder.linear_1.weight", where)
    return {
        "patch_size": tuple(config.get("patch_size", (1, 2, 2))),
        "num_attention_heads": heads,
        "attention_head_dim": dim // heads,
        "in_channels": int(config["in_dim"]),
        "out_channels": int(config["out_dim"]),
        "text_dim": int(text[1]),
        "freq_dim": int(config["freq_dim"]),
        "ffn_dim": int(config["ffn_dim"]),
        "num_layers": int(config["num_layers"]),
        "cross_attn_norm": bool(config.get("cross_attn_norm", True)),
        "qk_norm": "rms_norm_across_heads" if config.get("qk_norm", True) else None,
        "eps": float(config["eps"]),
    }


def _shape(state: Mapping[str, torch.Tensor], key: str, where: Path) -> tuple[int, ...]:
    if key not in state:
        raise HarnessError(f"{where}: weight {key!r} is missing, so the architecture cannot be read from the tensors")
    return tuple(state[key].shape)


def infer_config(state: Mapping[str, torch.Tensor], where: Path, known_heads: Mapping[int, int] = KNOWN_HEADS) -> dict:
    """The architecture of a diffusers-keyed state dict, from tensor shapes alone.

    The head count is the one thing shapes do not give: it comes from ``known_heads`` (width ->
    heads, Wan2.1's 1.3B and 14B plus the embedded models) or the Wan family's head dim 128;
    anything else needs ``--base-model``.
    """
    inner, in_channels, *patch = _shape(state, "patch_embedding.weight", where)
    if any(key.startswith("condition_embedder.image_embedder.") for key in state):
        raise HarnessError(f"{where}: image-to-video checkpoints are not supported; only text-to-video")
    if inner in known_heads:
        heads = known_heads[inner]
    elif inner % WAN_HEAD_DIM == 0:
        heads = inner // WAN_HEAD_DIM
    else:
        raise HarnessError(
            f"{where}: hidden width {inner} does not tell the head count (not a known Wan width, not a multiple "
            f"of {WAN_HEAD_DIM}); pass --base-model DIR (a dir with the model's config.json)"
        )
    layers = {int(key.split(".")[1]) for key in state if key.startswith("blocks.")}
    if layers != set(range(len(layers))) or not layers:
        raise HarnessError(f"{where}: transformer blocks are not numbered 0..N-1 (found {sorted(layers)[:10]})")
    patch_volume = patch[0] * patch[1] * patch[2]
    return {
        "patch_size": tuple(patch),
        "num_attention_heads": heads,
        "attention_head_dim": inner // heads,
        "in_channels": in_channels,
        "out_channels": _shape(state, "proj_out.weight", where)[0] // patch_volume,
        "text_dim": _shape(state, "condition_embedder.text_embedder.linear_1.weight", where)[1],
        "freq_dim": _shape(state, "condition_embedder.time_embedder.linear_1.weight", where)[1],
        "ffn_dim": _shape(state, "blocks.0.ffn.net.0.proj.weight", where)[0],
        "num_layers": len(layers),
        "cross_attn_norm": "blocks.0.norm2.weight" in state,
        "qk_norm": "rms_norm_across_heads" if "blocks.0.attn1.norm_q.weight" in state else None,
        "eps": 1e-6,
    }


def original_to_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original Wan key names -> diffusers', with diffusers' conversion (the input is not changed)."""
    return convert_wan_transformer_to_diffusers(dict(state))


def _key_style(state: Mapping[str, torch.Tensor]) -> str | None:
    if any(".attn1." in key for key in state):
        return "diffusers"
    if any(".self_attn." in key for key in state):
        return "original"
    return None


def to_diffusers_keys(state: Mapping[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    """Strip trainer prefixes and convert original names; diffusers names pass through."""
    state = dict(state)
    changed = True
    while changed:
        changed = False
        for prefix in KEY_PREFIXES:
            if state and all(key.startswith(prefix) for key in state) and not any(
                key.startswith(prefix + "diffusion_model.") for key in state
            ):
                state = {key[len(prefix) :]: value for key, value in state.items()}
                changed = True
    style = _key_style(state)
    if style is None:
        sample = sorted(state)[:5]
        raise HarnessError(
            f"{where}: weights are neither original Wan keys (blocks.N.self_attn.q.weight) nor diffusers keys "
            f"(blocks.N.attn1.to_q.weight); first keys: {sample}"
        )
    return original_to_diffusers(state) if style == "original" else state


def _tensor_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def select_generator(obj: object, where: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The generator weights of a training checkpoint and the entry they came from."""
    if not isinstance(obj, Mapping):
        raise HarnessError(f"{where}: expected a dict of weights, found a {type(obj).__name__}")
    for entry in GENERATOR_ENTRIES:
        nested = obj.get(entry)
        if _tensor_dict(nested):
            return dict(nested), entry
        flat = {k[len(entry) + 1 :]: v for k, v in obj.items() if isinstance(k, str) and k.startswith(entry + ".")}
        if flat:
            return flat, entry
    if _tensor_dict(obj):
        return dict(obj), ""
    entries = sorted(str(k) for k in obj)[:12]
    raise HarnessError(
        f"{where}: no generator weights: expected an entry {' or '.join(GENERATOR_ENTRIES)} holding a dict of "
        f"tensors, or a flat dict of tensors; found entries {entries}"
    )


def load_checkpoint_file(path: Path) -> object:
    """A ``.safetensors`` file as a dict, or a ``.pt`` file with torch's weights-only loader."""
    return load_tensors(path, what="a training checkpoint: the generator's state_dict (tensors only)")


def read_weights(files: tuple[Path, ...]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(load_tensors(path, what="a safetensors weights file"))
    return state
