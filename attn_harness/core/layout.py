"""Which checkpoint layout a model path is, and where its config and weight files are.

Torch-free (file names and JSON only), so collecting specs and computing cache keys never
imports torch; ``attn_harness.model.layouts`` reads the weights and converts keys.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from attn_harness.core.errors import HarnessError

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors")
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
LAYOUTS_LOOKED_FOR = (
    "a diffusers pipeline dir (model_index.json + transformer/config.json)",
    "a diffusers transformer dir (config.json with _class_name WanTransformer3DModel + *.safetensors)",
    "an original Wan dir (config.json with _class_name WanModel + diffusion_pytorch_model.safetensors "
    "or *.safetensors.index.json shards)",
    f"a training checkpoint file ({', '.join(CHECKPOINT_SUFFIXES)}) holding generator_ema / generator",
)


@dataclass(frozen=True)
class Layout:
    """Where a model's pieces are: its kind, the dir holding its config, and its weight files."""

    kind: str
    path: Path
    config_dir: Path | None
    weight_files: tuple[Path, ...]


def _no_layout(path: Path, detail: str = "") -> HarnessError:
    if path.is_dir():
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
        found = ", ".join(names[:15]) + (f", ... ({len(names)} entries)" if len(names) > 15 else "") or "an empty dir"
    else:
        found = f"a file with suffix {path.suffix!r}" if path.exists() else "nothing (no such path)"
    looked = "; ".join(LAYOUTS_LOOKED_FOR)
    extra = f" ({detail})" if detail else ""
    return HarnessError(f"{path}: not a model layout this harness can load{extra}. Looked for {looked}. Found: {found}")


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise HarnessError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from err
    if not isinstance(data, dict):
        raise HarnessError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _weights_in(directory: Path) -> tuple[Path, ...]:
    """Weight files of a dir: the shards an index names, else the single safetensors file(s)."""
    indexes = sorted(directory.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = read_json(indexes[0]).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise HarnessError(f"{indexes[0]}: no 'weight_map' object naming the shard of each key")
        shards = tuple(sorted({directory / name for name in weight_map.values()}))
        missing = [p.name for p in shards if not p.is_file()]
        if missing:
            raise HarnessError(f"{indexes[0]}: shard file(s) {missing} named in weight_map are missing from {directory}")
        return shards
    return tuple(sorted(directory.glob("*.safetensors")))


def detect_layout(path: str | Path) -> Layout:
    """Which of the four layouts ``path`` is, or one error listing what was looked for and found."""
    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix in CHECKPOINT_SUFFIXES:
            return Layout("training-checkpoint", path, None, (path,))
        raise _no_layout(path)
    if not path.is_dir():
        raise _no_layout(path)
    if (path / "model_index.json").is_file() and (path / "transformer" / "config.json").is_file():
        kind, config_dir = "diffusers-pipeline", path / "transformer"
    elif (path / "config.json").is_file():
        class_name = read_json(path / "config.json").get("_class_name")
        kinds = {"WanTransformer3DModel": "diffusers-transformer", "WanModel": "wan-original"}
        if class_name not in kinds:
            raise _no_layout(path, f"config.json has _class_name {class_name!r}, expected WanTransformer3DModel or WanModel")
        kind, config_dir = kinds[class_name], path
    else:
        raise _no_layout(path)
    weights = _weights_in(config_dir)
    if not weights:
        raise _no_layout(path, f"{config_dir / 'config.json'} has no *.safetensors weights beside it")
    return Layout(kind, path, config_dir, weights)
