"""Static facts about model sources, answered without torch: the embedded models' names,
architecture and weight files, the block count of a model on disk, and what decides the
weights of a model built in process.

Collecting ``specs/`` and looking up a cached extraction need only these facts, so a warm
``pytest specs/`` never imports torch or diffusers. ``attn_harness.model.models`` builds
the models from the same data.
"""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import attn_harness
from attn_harness.core.errors import HarnessError
from attn_harness.core.fingerprint import files_fingerprint, sha256_json
from attn_harness.core.layout import detect_layout, read_json

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
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
# Trained embedded models: package data in diffusers layout, one folder each.
FIXTURE_FOLDERS = {"tiny-trained": "tiny_trained", "tiny-trained-causal": "tiny_trained_causal"}
# Built in process from TINY_CONFIG under TINY_SEED: no files, weights decided by the versions.
BUILT = ("tiny-random",)
EMBEDDED_NAMES: tuple[str, ...] = (*BUILT, *FIXTURE_FOLDERS)


def source_path(source: str | Path) -> Path:
    """The directory or file a source's weights live in (an embedded fixture's package folder)."""
    name = str(source)
    if name in FIXTURE_FOLDERS:
        return FIXTURES / FIXTURE_FOLDERS[name]
    if name in BUILT:
        raise HarnessError(f"{name!r} is built in process and has no files")
    return Path(source).expanduser()


def architecture(source: str | Path) -> dict | None:
    """The raw config of a source (embedded, or a dir layout's ``config.json``); ``None`` for a
    training checkpoint file, whose architecture is only in its tensors."""
    if str(source) in BUILT:
        return dict(TINY_CONFIG)
    layout = detect_layout(source_path(source))
    return read_json(layout.config_dir / "config.json") if layout.config_dir is not None else None


def num_layers(source: str | Path) -> int | None:
    """The block count from the config (``None`` for a checkpoint file: read its weights)."""
    config = architecture(source)
    if config is None:
        return None
    value = config.get("num_layers")
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    config_file = detect_layout(source_path(source)).config_dir / "config.json"
    raise HarnessError(f"{config_file}: no integer num_layers")


def weight_files(source: str | Path) -> tuple[Path, ...] | None:
    """The files holding a source's weights (what its fingerprint hashes); ``None`` when it is
    built in process."""
    if str(source) in BUILT:
        return None
    return detect_layout(source_path(source)).weight_files


def built_identity(name: str) -> str:
    """Everything that decides the weights of a model built in process: its config, seed, and
    the torch, diffusers and harness versions (their initialisation code). Read from package
    metadata, so torch is not imported."""
    if name not in BUILT:
        raise HarnessError(f"{name!r} is not built in process; one of {', '.join(BUILT)}")
    config = sha256_json(TINY_CONFIG)[:16]
    versions = " ".join(f"{dist} {_version(dist)}" for dist in ("torch", "diffusers"))
    return f"embedded:{name}|config {config}|seed {TINY_SEED}|{versions}|harness {attn_harness.__version__}"


def source_identity(source: str | Path) -> str:
    """What identifies a source's weights in cache keys, without torch: the sha256 of its weight
    files (what the dataset attrs record, remembered on disk), or ``built_identity`` for a model
    built in process."""
    files = weight_files(source)
    return files_fingerprint(files) if files is not None else built_identity(str(source))


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "absent"


_BUILD_LINE = re.compile(r"^(cuda|hip)\b[^=]*=\s*(.+?)\s*$", re.MULTILINE)


def cuda_ruled_out() -> bool:
    """True when torch.cuda.is_available() is certainly False, decided without importing torch:
    torch is absent, or its build has neither CUDA nor ROCm (``torch/version.py`` says
    ``cuda = None`` and ``hip = None``). False means "ask torch"."""
    from importlib.util import find_spec

    spec = find_spec("torch")
    if spec is None or spec.origin is None:
        return True
    try:
        text = (Path(spec.origin).parent / "version.py").read_text()
    except OSError:
        return False
    builds = dict(_BUILD_LINE.findall(text))
    return bool(builds) and all(value == "None" for value in builds.values())
