"""Run one spec's extraction in a fresh Python process under environment overrides.

Kernel choice is fixed when torch starts (``ATEN_CPU_CAPABILITY``, ``MKL_ENABLE_INSTRUCTIONS``,
``ONEDNN_MAX_CPU_ISA``, ``OMP_NUM_THREADS``), so measuring the drift between two environments
needs two processes. ``python -m attn_harness.sampling.spec_env SPEC_FILE NAME OUT.nc`` is
the child; ``extract_in_env`` starts it. No extraction cache is used: each run computes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from attn_harness.core import store
from attn_harness.core.errors import HarnessError
from attn_harness.core.spec import load_specs, resolve_model


def parse_env(items: list[str] | None) -> dict[str, str]:
    """``["KEY=value", ...]`` -> ``{"KEY": "value"}``; a malformed item is a ``HarnessError``."""
    env = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise HarnessError(f"--env {item!r}: expected KEY=value, e.g. ATEN_CPU_CAPABILITY=avx2")
        env[key] = value
    return env


def extract_spec(spec_file: str | os.PathLike, name: str, out: str | os.PathLike, root: str | os.PathLike = ".") -> Path:
    """Extract spec ``name`` of ``spec_file`` (model paths relative to ``root``) and write ``out``."""
    from attn_harness.model.models import EMBEDDED
    from attn_harness.sampling.extract import extract

    specs = {spec.name: spec for spec in load_specs(spec_file)}
    if name not in specs:
        raise HarnessError(f"{spec_file}: no spec named {name!r}; specs are {', '.join(specs)}")
    spec = specs[name]
    source, reason = resolve_model(spec.model, embedded=tuple(EMBEDDED), root=Path(root))
    base_model = None
    if spec.base_model and not reason:
        base_model, reason = resolve_model(spec.base_model, embedded=tuple(EMBEDDED), root=Path(root))
    if reason:
        raise HarnessError(f"{spec_file}: spec {name!r}: {reason}")
    return store.write_dataset(extract(source, spec.probe, progress=False, base_model=base_model), Path(out))


def extract_in_env(spec_file: str | os.PathLike, name: str, out: Path, overrides: Mapping[str, str]) -> Path:
    """Run ``extract_spec`` in a child process whose environment is ours plus ``overrides``."""
    env = {**os.environ, **overrides}
    command = [sys.executable, "-m", "attn_harness.sampling.spec_env", str(spec_file), name, str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        shown = " ".join(f"{k}={v}" for k, v in overrides.items()) or "the current environment"
        raise HarnessError(f"extraction of spec {name!r} under {shown} failed: {tail}")
    return out


def main(argv: list[str]) -> int:
    try:
        extract_spec(*argv)
    except HarnessError as err:
        print(f"attn-harness: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
