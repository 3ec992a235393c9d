"""The one place that reads ``torch.save`` files: weights-only, never executing pickled code.

Every ``.pt`` / ``.pth`` the harness reads (seed notebook files, training checkpoints, prompt
embeddings, the original umT5 weights) goes through :func:`safe_load`, so one rule holds
everywhere: ``torch.load(weights_only=True)``, memory-mapped when the file is in torch's zip
format (a checkpoint of gigabytes is not copied into memory twice), and every failure is one
``HarnessError`` line naming the file and what to do.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import torch

from attn_harness.core.errors import HarnessError


def safe_load(path: str | Path, *, what: str = "a file written by torch.save") -> object:
    """``torch.load(path, weights_only=True)`` on the CPU; ``what`` names the expected content in errors."""
    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"{path} does not exist; expected {what}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if refused is None:  # not a pickle at all (torch reports an unsupported opcode)
            raise HarnessError(f"{path} is not a file written by torch.save, or it is corrupt; expected {what}") from exc
        raise HarnessError(
            f"{path} contains Python objects ({refused.group(1)}) that safe loading (torch.load weights_only=True) "
            "refuses. The harness does not execute pickled code; re-save the file as tensors and plain Python "
            "values (dict, list, int, float, str)"
        ) from exc
    except Exception as exc:  # torch raises KeyError, EOFError, RuntimeError ... for files it cannot read
        raise HarnessError(
            f"{path} is not a file written by torch.save ({type(exc).__name__}: {str(exc)[:200]}); expected {what}"
        ) from exc
