"""Attention regression harness for video diffusion transformers.

The public API, for notebooks and ordinary test files (the layering and the data contract are
in docs/design.md):

- ``load_model(source)``: an embedded model by name (``tiny-trained``, ...) or a checkpoint dir/file
- ``Probe(...)``: what one extraction runs (prompt, geometry, steps, layers, metrics, mask)
- ``extract(model, probe)``: the sampler run with capture, as an ``xarray.Dataset``
- ``read_dataset`` / ``write_dataset`` / ``validate``: NetCDF extractions and the data contract
- ``import_legacy(path)``: the seed notebook's ``.pt`` files as an extraction
- ``run_check(ds, name, params, layer=)``: one property check; ``PROPERTIES`` lists them
- ``frame_stats(q, k, tokens_per_frame)``: the exact frame x frame statistics of one attention call
- ``capture(model, layers, recorder)`` with a ``Recorder``: the capture context on a Wan model
- ``head_stats`` / ``layer_summary`` / ``default_query_frames``: the seed's per-head statistics

The ``ds.attn`` xarray accessor (``attn_harness.accessor``) is registered on import when xarray is
already loaded, else right after xarray is imported; names are imported on first use, so
``import attn_harness`` imports neither torch nor xarray.
``attn_harness.testing`` has ``assert_property`` and ``assert_baseline`` for pytest functions.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"



def _attn(ds: Any) -> Any:
    """``ds.attn``: an ``attn_harness.accessor.AttnAccessor`` (the module is imported on first use)."""
    from attn_harness.accessor import AttnAccessor

    return AttnAccessor(ds)


def _register_accessor(xr: Any) -> None:
    """Register ``ds.attn`` on xarray's Dataset (once); imports nothing of the harness."""
    if "attn" not in xr.Dataset.__dict__:
        xr.register_dataset_accessor("attn")(_attn)


class _AfterXarrayImport(importlib.abc.MetaPathFinder):
    """Registers ``ds.attn`` right after xarray's own import, wherever that happens: the pytest
    plugin imports this package before any test file imports xarray."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "xarray":
            return None
        sys.meta_path.remove(self)  # once; the search below finds the real module
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            run_module = spec.loader.exec_module

            def exec_module(module: Any) -> None:
                run_module(module)
                _register_accessor(module)

            spec.loader.exec_module = exec_module
        return spec


# ds.attn: registered now if xarray is already loaded, else as soon as xarray is imported, so that
# importing a module of the package (the pytest plugin, the torch-free core) stays cheap.
if "xarray" in sys.modules:
    _register_accessor(sys.modules["xarray"])
elif not any(isinstance(finder, _AfterXarrayImport) for finder in sys.meta_path):
    sys.meta_path.insert(0, _AfterXarrayImport())

# public name -> the module that defines it (imported on first attribute access)
_EXPORTS: dict[str, str] = {
    "HarnessError": "attn_harness.core.errors",
    "Probe": "attn_harness.core.probe",
    "read_dataset": "attn_harness.core.store",
    "write_dataset": "attn_harness.core.store",
    "validate": "attn_harness.core.store",
    "run_check": "attn_harness.core.checks",
    "CheckResult": "attn_harness.core.checks",
    "PROPERTIES": "attn_harness.core.checks",
    "head_stats": "attn_harness.core.metrics",
    "layer_summary": "attn_harness.core.metrics",
    "default_query_frames": "attn_harness.core.metrics",
    "latent_frame_of_pixel": "attn_harness.core.frames",
    "load_model": "attn_harness.model.models",
    "LoadedModel": "attn_harness.model.models",
    "frame_stats": "attn_harness.model.capture",
    "capture": "attn_harness.model.capture",
    "Recorder": "attn_harness.model.capture",
    "import_legacy": "attn_harness.model.legacy",
    "extract": "attn_harness.sampling.extract",
}

__all__ = [
    "__version__",
    "HarnessError",
    "Probe",
    "read_dataset",
    "write_dataset",
    "validate",
    "run_check",
    "CheckResult",
    "PROPERTIES",
    "head_stats",
    "layer_summary",
    "default_query_frames",
    "latent_frame_of_pixel",
    "load_model",
    "LoadedModel",
    "frame_stats",
    "capture",
    "Recorder",
    "import_legacy",
    "extract",
]

if TYPE_CHECKING:  # static tools see the real names; at run time they load lazily
    from attn_harness.core.checks import PROPERTIES, CheckResult, run_check
    from attn_harness.core.errors import HarnessError
    from attn_harness.core.frames import latent_frame_of_pixel
    from attn_harness.core.metrics import default_query_frames, head_stats, layer_summary
    from attn_harness.core.probe import Probe
    from attn_harness.core.store import read_dataset, validate, write_dataset
    from attn_harness.model.capture import Recorder, capture, frame_stats
    from attn_harness.model.legacy import import_legacy
    from attn_harness.model.models import LoadedModel, load_model
    from attn_harness.sampling.extract import extract


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'attn_harness' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
