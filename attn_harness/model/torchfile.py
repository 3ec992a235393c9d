"""The one place that reads tensor files: weights-only, never executing pickled code.

Every ``.pt`` / ``.pth`` / ``.safetensors`` the harness reads (seed notebook files, training
checkpoints, prompt embeddings, weights, the original umT5 weights) goes through this module,
so one rule holds everywhere: ``torch.load(weights_only=True)``, memory-mapped when the file is
in torch's zip format (a checkpoint of gigabytes is not copied into memory twice), and every
failure is one ``HarnessError`` line naming the file and what it should have been.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from attn_harness.core.errors import HarnessError


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        state = "is a directory" if path.is_dir() else "does not exist"
        raise HarnessError(f"{path} {state}; expected {what}")


def safe_load(path: str | Path, *, what: str = "a file written by torch.save") -> object:
    """``torch.load(path, weights_only=True)`` on the CPU; ``what`` names the expected content in errors."""
    path = Path(path)
    _require_file(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if refused is None:  # not a pickle at all (torch reports an unsupported opcode)
            raise HarnessError(f"{path} is not a file written by torch.save, or it is corrupt; expected {what}") from None
        raise HarnessError(
            f"{path} contains Python objects ({refused.group(1)}) that safe loading refuses; the harness never runs "
            f"pickled code: re-save {what} as tensors and plain Python values (dict, list, int, float, str)"
        ) from None
    except Exception as exc:  # torch raises KeyError, EOFError, RuntimeError ... for files it cannot read
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise HarnessError(f"{path} is not a file written by torch.save ({type(exc).__name__}: {first}); "
                           f"expected {what}") from None


def load_tensors(path: str | Path, *, what: str) -> object:
    """A ``.safetensors`` file as a dict of tensors, anything else through :func:`safe_load`."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return safe_load(path, what=what)
    _require_file(path, what)
    try:
        return load_file(path)
    except Exception as exc:  # safetensors raises its own error types for a corrupt header or data
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise HarnessError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {first}); "
                           f"expected {what}") from None
