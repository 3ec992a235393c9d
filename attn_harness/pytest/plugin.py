"""pytest plugin: collect ``specs/**/*.yaml`` into one item per (spec, layer, property) and
one baseline item per (spec, layer).

Registered through the ``pytest11`` entry point ``attn_harness``. Node ids read
``specs/tiny_default.yaml::tiny-default::layer3::sink_score``. Items of one spec share one
extraction, cached on disk (``attn_harness.sampling.cache``). ``--attn-results DIR`` writes
``DIR/results.json`` (one record per item) at the end of the run, then renders the HTML
report if ``attn_harness/report/html.py`` exists. ``--force-regen`` and ``--regen-all`` come from
pytest-regressions, whose semantics the baseline items follow.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import attn_harness
from attn_harness.pytest import baseline as baseline_mod
from attn_harness.core import catalog, checks
from attn_harness.core.atomic import write_atomic
from attn_harness.sampling.cache import DEFAULT_DIR, ExtractionCache
from attn_harness.core.errors import HarnessError
from attn_harness.core.probe import Probe
from attn_harness.core.spec import PropertyCheck, Spec, SpecError, load_specs, resolve_model

SPEC_SUFFIXES = (".yaml", ".yml")
PROVENANCE_KEYS = (
    "model_id", "checkpoint_path", "checkpoint_layout", "checkpoint_fingerprint", "prompt_encoder",
    "dtype", "device", "mask", "mode", "block_size",
    "harness_version", "torch_version", "diffusers_version", "created",
)


class AttnCheckWarning(UserWarning):
    """A failing property with ``severity: warn``."""


class CheckFailed(Exception):
    """A property or baseline that does not hold; reported as its message, without traceback."""


@dataclass
class _State:
    """Per-process state: the cache and the extractions already loaded by this process."""

    cache: ExtractionCache
    started: float = field(default_factory=time.time)
    loaded: dict[str, Any] = field(default_factory=dict)  # spec key -> (ds, path) or HarnessError
    records: dict[str, dict] = field(default_factory=dict)  # nodeid -> record (controller)
    specs: dict[str, dict] = field(default_factory=dict)  # spec name -> spec entry (controller)

    def dataset(self, spec: Spec, source: str, base_model: str | None, probe: Probe):
        key = f"{spec.file}::{spec.name}"
        if key not in self.loaded:
            try:
                self.loaded[key] = self.cache.load_or_extract(source, probe, base_model=base_model)
            except HarnessError as err:
                self.loaded[key] = err
        found = self.loaded[key]
        if isinstance(found, HarnessError):
            raise found
        return found


_STATE = pytest.StashKey[_State]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("attn-harness", "attention specs (attn_harness.pytest.plugin)")
    group.addoption("--attn-cache", metavar="DIR", default=None,
                    help=f"extraction cache directory (default: {DEFAULT_DIR} under the rootdir)")
    group.addoption("--attn-cache-clear", action="store_true", default=False,
                    help="delete the extraction cache before the run")
    group.addoption("--attn-results", metavar="DIR", default=None,
                    help="also write DIR/results.json with every check of the run")
    group.addoption("--attn-report", metavar="DIR", default=None,
                    help="write the HTML report to DIR/index.html (default: reports/latest under the rootdir)")
    group.addoption("--no-attn-report", action="store_true", default=False,
                    help="do not write the HTML report")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped when none is present")
    config.addinivalue_line("markers", "slow: a long extraction (deselect with -m 'not slow')")
    directory = Path(config.getoption("attn_cache") or config.rootpath / DEFAULT_DIR)
    cache = ExtractionCache(directory)
    if config.getoption("attn_cache_clear") and not hasattr(config, "workerinput"):
        cache.clear()
    state = _State(cache=cache)
    config.stash[_STATE] = state
    if not hasattr(config, "workerinput"):
        config.pluginmanager.register(_Collector(state), "attn-harness-results")
        config.pluginmanager.register(baseline_mod.RegenSummary(), "attn-harness-regen-summary")


def _is_spec_file(file_path: Path, root: Path) -> bool:
    if file_path.suffix not in SPEC_SUFFIXES:
        return False
    try:
        folders = file_path.relative_to(root).parts[:-1]
    except ValueError:
        folders = file_path.parts[:-1]
    return "specs" in folders


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if _is_spec_file(file_path, parent.config.rootpath):
        return SpecFile.from_parent(parent, path=file_path)
    return None


class SpecFile(pytest.File):
    """A YAML spec file; a mistake in it is one collection error with file:line and key."""

    def collect(self):
        display = self.nodeid or self.path.name
        try:
            specs = load_specs(self.path, display=display)
        except SpecError as err:
            raise self.CollectError(str(err)) from None
        for spec in specs:
            yield SpecNode.from_parent(self, name=spec.name, spec=spec)


def _num_layers(source: str) -> int:
    """How many transformer blocks the model has (to expand ``all``), from its config without
    torch; only a training checkpoint file (no config) is opened with torch."""
    known = catalog.num_layers(source)
    if known is not None:
        return known
    from attn_harness.model.models import num_layers

    return num_layers(source)


def _cuda_available() -> bool:
    """torch.cuda.is_available(), without importing torch when its build has no CUDA."""
    if catalog.cuda_ruled_out():
        return False
    import torch

    return torch.cuda.is_available()


class SpecNode(pytest.Collector):
    """One spec: carries its marks and skip reasons; children are its layers."""

    def __init__(self, *, spec: Spec, **kwargs) -> None:
        super().__init__(**kwargs)
        self.spec = spec
        self.source: str | None = None
        self.base_model: str | None = None
        self.probe: Probe = spec.probe

    def collect(self):
        spec = self.spec
        self._apply_marks()
        root = self.config.rootpath
        source, reason = resolve_model(spec.model, embedded=_embedded_names(), root=root)
        if spec.base_model and not reason:
            self.base_model, reason = resolve_model(spec.base_model, embedded=_embedded_names(), root=root)
        if spec.probe.prompt_embeds and not reason:
            embeds, reason = resolve_model(spec.probe.prompt_embeds, embedded=(), root=root)
            self.probe = spec.probe.replace(prompt_embeds=embeds)
        self.source = source
        if reason:
            self.add_marker(pytest.mark.skip(reason=f"spec {spec.name!r}: {reason}"))
        num_layers = None
        needs_all = any(g.layers == "all" for g in spec.groups) or (spec.baseline and spec.baseline.layers == "all")
        if source and needs_all:
            try:
                num_layers = _num_layers(source)
            except HarnessError as err:
                raise self.CollectError(f"{spec.file}:{spec.line}: spec {spec.name!r}: {err}") from None
        by_layer = spec.checks_by_layer(num_layers)
        baseline_layers = spec.baseline_layers(num_layers)
        for layer in sorted(set(by_layer) | set(baseline_layers), key=lambda v: (isinstance(v, str), v)):
            yield LayerNode.from_parent(
                self, name=f"layer{layer}", layer=layer, checks=by_layer.get(layer, []),
                with_baseline=layer in baseline_layers,
            )

    def _apply_marks(self) -> None:
        for mark in self.spec.marks:
            if mark.name in ("gpu", "slow"):
                self.add_marker(getattr(pytest.mark, mark.name))
                if mark.name == "gpu" and not _cuda_available():
                    self.add_marker(pytest.mark.skip(
                        reason=f"spec {self.spec.name!r} is marked gpu and no CUDA device is present "
                        "(torch.cuda.is_available() is False)"
                    ))
            elif mark.name == "skipif":
                self.add_marker(pytest.mark.skipif(mark.kwargs["condition"], reason=mark.kwargs["reason"]))
            else:
                self.add_marker(pytest.mark.xfail(**mark.kwargs))


def _embedded_names() -> tuple[str, ...]:
    return catalog.EMBEDDED_NAMES


class LayerNode(pytest.Collector):
    def __init__(self, *, layer: int | str, checks: list[PropertyCheck], with_baseline: bool, **kwargs) -> None:
        super().__init__(**kwargs)
        self.layer = layer
        self.checks = checks
        self.with_baseline = with_baseline

    def collect(self):
        for check in self.checks:
            yield PropertyItem.from_parent(self, name=check.name, check=check)
        if self.with_baseline:
            yield BaselineItem.from_parent(self, name="baseline")


class _SpecItem(pytest.Item):
    """Shared by property and baseline items: the extraction, the record, the reporting."""

    kind = "property"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.spec_node: SpecNode = self.parent.parent
        self.layer = self.parent.layer
        self.outcome: dict[str, Any] = {}
        self.started = 0.0

    @property
    def spec(self) -> Spec:
        return self.spec_node.spec

    def dataset(self):
        if self.layer == "all" or self.spec_node.source is None:
            raise HarnessError(f"spec {self.spec.name!r} has no usable model")
        state = self.config.stash[_STATE]
        ds, path = state.dataset(self.spec, self.spec_node.source, self.spec_node.base_model, self.spec_node.probe)
        self.outcome["spec_entry"] = {
            "spec": self.spec.name, "file": self.spec.file, "line": self.spec.line, "model": self.spec_node.source,
            "probe": self.spec.probe.as_dict(), "dataset": str(path),
            "provenance": {key: ds.attrs.get(key) for key in PROVENANCE_KEYS},
        }
        return ds

    def setup(self) -> None:
        self.started = time.perf_counter()

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, CheckFailed):
            return str(excinfo.value)
        if isinstance(excinfo.value, HarnessError):  # the spec could not be run: point at it
            return f"{self.spec.file}:{self.spec.line}: spec {self.spec.name!r}: {excinfo.value}"
        return super().repr_failure(excinfo, style=style)

    def base_record(self) -> dict:
        return {
            "nodeid": self.nodeid, "spec": self.spec.name, "file": self.spec.file, "layer": self.layer,
            "kind": self.kind, "baseline": None, "obtained": None, "regen_command": None, "violations": [],
            "observed": "", "expected": "",
        }


class PropertyItem(_SpecItem):
    def __init__(self, *, check: PropertyCheck, **kwargs) -> None:
        super().__init__(**kwargs)
        self.check = check

    def runtest(self) -> None:
        result = checks.run_check(self.dataset(), self.check.property, self.check.params, layer=self.layer)
        self.outcome.update(status=result.status, observed=result.observed, expected=result.expected,
                            message=result.message, violations=[v.as_record() for v in result.violations])
        if result.status == "warn":
            warnings.warn(AttnCheckWarning(f"{self.nodeid} (severity warn)\n{result.message}"), stacklevel=1)
        elif result.status == "fail":
            raise CheckFailed(result.message)

    def reportinfo(self):
        return self.path, self.check.line - 1, f"{self.spec.name}::layer{self.layer}::{self.name}"

    def base_record(self) -> dict:
        params = self.check.params
        return {**super().base_record(), "line": self.check.line, "property": self.check.property,
                "severity": params["severity"], "metric": params["metric"]}


class BaselineItem(_SpecItem):
    kind = "baseline"

    def baseline_path(self) -> Path:
        return self.config.rootpath / self.spec.baseline_path(self.layer)

    def runtest(self) -> None:
        path = self.baseline_path()
        obtained = baseline_mod.layer_slice(self.dataset(), self.layer)
        self.outcome["status"] = "fail"
        try:
            done = baseline_mod.check_baseline(
                obtained, path, self.spec.baseline.tolerances, config=self.config,
                regen_command=f"pytest '{self.nodeid}'", cross_env=self.spec.baseline.cross_env,
                spec_location=f"{self.spec.file}:{self.spec.baseline.line}",
            )
        except AssertionError as err:
            self.outcome["message"] = str(err)
            raise CheckFailed(str(err)) from None
        except pytest.fail.Exception as err:  # written from this run (missing, or --force-regen)
            self.outcome["message"] = f"{err.msg}\nreview it and commit it; the next run compares against it"
            raise CheckFailed(self.outcome["message"]) from None
        self.outcome.update(status="pass", message=done.text(), expected=done.tolerance, baseline_file=done.file)
        if done.action != "compared":
            self.user_properties.append((baseline_mod.REGEN_PROPERTY, (done.action, _relative(done.file, self.config.rootpath), done.reason)))

    def reportinfo(self):
        return self.path, self.spec.baseline.line - 1, f"{self.spec.name}::layer{self.layer}::baseline"

    def base_record(self) -> dict:
        path = self.baseline_path()
        obtained = baseline_mod.obtained_file(path)
        return {**super().base_record(), "line": self.spec.baseline.line, "property": "baseline",
                "severity": "fail", "metric": "logits",
                "baseline": _relative(self.outcome.get("baseline_file", path), self.config.rootpath),
                "obtained": _relative(obtained, self.config.rootpath) if obtained.is_file() else None,
                "regen_command": f"pytest '{self.nodeid}' --force-regen"}


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if not isinstance(item, _SpecItem) or report.when == "teardown" or (report.when == "setup" and report.passed):
        return report
    record = item.base_record()
    record["duration_s"] = round(time.perf_counter() - item.started, 4) if item.started else 0.0
    outcome = item.outcome
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if hasattr(report, "wasxfail"):
            reason = f"expected failure (xfail): {report.wasxfail}"
        status = "skip"
        message = reason
    elif report.failed and report.when == "setup":
        status, message = "error", str(report.longrepr)
    elif report.failed:
        status = "fail" if outcome.get("status") == "fail" else "error"
        message = outcome.get("message") or str(report.longrepr)
    else:
        status, message = outcome.get("status", "pass"), outcome.get("message", "")
    record.update(status=status, message=message,
                  **{k: outcome[k] for k in ("observed", "expected", "violations") if k in outcome})
    report.attn_record = record
    report.attn_spec = outcome.get("spec_entry")
    return report


class _Collector:
    """Gathers the records from reports (with xdist the controller sees reports, not items)."""

    def __init__(self, state: _State) -> None:
        self.state = state

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        record = getattr(report, "attn_record", None)
        if record is None:
            return
        self.state.records[record["nodeid"]] = record
        spec_entry = getattr(report, "attn_spec", None)
        if spec_entry:
            self.state.specs.setdefault(spec_entry["spec"], spec_entry)


def _output_dir(config: pytest.Config, option: str | None, default: Path | None) -> Path | None:
    if option is None:
        return default
    path = Path(option)
    return path if path.is_absolute() else Path(config.invocation_params.dir) / path


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    if hasattr(config, "workerinput"):
        return
    state = config.stash[_STATE]
    if not state.records:
        return  # no spec items ran: nothing to summarise
    results_dir = _output_dir(config, config.getoption("attn_results"), None)
    report_dir = None
    if not config.getoption("no_attn_report"):
        report_dir = _output_dir(config, config.getoption("attn_report"), config.rootpath / "reports" / "latest")
    results = {
        "run": {
            "command": " ".join(["pytest", *config.invocation_params.args]),
            "started": dt.datetime.fromtimestamp(state.started, dt.timezone.utc).isoformat(timespec="seconds"),
            "duration_s": round(time.time() - state.started, 3),
            "harness_version": attn_harness.__version__,
        },
        "specs": list(state.specs.values()),
        "checks": sorted(state.records.values(), key=lambda r: r["nodeid"]),
    }
    if results_dir is not None:
        write_results(results, results_dir)
    if report_dir is not None:
        from attn_harness.report.html import render_run_report  # matplotlib: only when a report is wanted

        write_results(results, report_dir)
        path = render_run_report(results, report_dir)
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_sep("-", f"attention report: {path}")


def write_results(results: dict, out_dir: Path) -> Path:
    """Write ``out_dir/results.json`` atomically."""
    return write_atomic(out_dir / "results.json", json.dumps(results, indent=1, default=str).encode("utf-8"))
