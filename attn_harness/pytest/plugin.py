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
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest

import attn_harness
from attn_harness.pytest import baseline as baseline_mod
from attn_harness.core import catalog, checks, store
from attn_harness.core.results import CheckRecord, Results, RunInfo, SpecInfo
from attn_harness.core.schema import provenance_keys
from attn_harness.sampling.cache import DEFAULT_DIR, ExtractionCache
from attn_harness.core.errors import HarnessError
from attn_harness.core.probe import Probe
from attn_harness.core.spec import PropertyCheck, Spec, SpecError, load_specs, resolve_model

SPEC_SUFFIXES = (".yaml", ".yml")


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
    records: dict[str, CheckRecord] = field(default_factory=dict)  # nodeid -> record (controller)
    specs: dict[str, SpecInfo] = field(default_factory=dict)  # spec name -> spec entry (controller)
    report_path: Path | None = None
    remote: Any = None  # attn_harness.pytest.distributed.RemoteExtractions under --attn-scheduler

    def dataset(self, spec: Spec, source: str, base_model: str | None, probe: Probe):
        key = f"{spec.file}::{spec.name}"
        if key not in self.loaded:
            try:
                if self.remote is not None and key in self.remote:
                    self.loaded[key] = self.remote.result(key)
                else:
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
    group.addoption("--attn-scheduler", metavar="ADDR|local:N", default=None,
                    help="run the specs' extractions as tasks on a Dask cluster (local:N starts one here)")


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


def pytest_collection_finish(session: pytest.Session) -> None:
    scheduler = session.config.getoption("attn_scheduler")
    if scheduler:
        from attn_harness.pytest.distributed import submit_specs

        state = session.config.stash[_STATE]
        try:
            state.remote = submit_specs(session.items, state.cache, scheduler)
        except HarnessError as err:
            raise pytest.UsageError(f"--attn-scheduler {scheduler}: {err}") from None


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(_STATE, None)
    if state is not None and state.remote is not None:
        state.remote.close()


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
        self.outcome["spec_entry"] = SpecInfo(
            spec=self.spec.name, file=self.spec.file, line=self.spec.line, model=self.spec_node.source,
            probe=self.spec.probe.as_dict(), dataset=str(path),
            provenance={key: ds.attrs[key] for key in provenance_keys() if key in ds.attrs},
        )
        return ds

    def setup(self) -> None:
        self.started = time.perf_counter()

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, CheckFailed):
            return str(excinfo.value)
        if isinstance(excinfo.value, HarnessError):  # the spec could not be run: point at it
            return f"{self.spec.file}:{self.spec.line}: spec {self.spec.name!r}: {excinfo.value}"
        return super().repr_failure(excinfo, style=style)

    def base_record(self, status: str) -> CheckRecord:
        return CheckRecord(nodeid=self.nodeid, spec=self.spec.name, status=status, name=self.name,
                           file=self.spec.file, layer=self.layer, kind=self.kind)


class PropertyItem(_SpecItem):
    def __init__(self, *, check: PropertyCheck, **kwargs) -> None:
        super().__init__(**kwargs)
        self.check = check

    def runtest(self) -> None:
        result = checks.run_check(self.dataset(), self.check.property, self.check.params, layer=self.layer)
        self.outcome.update(status=result.status, observed=result.observed, expected=result.expected,
                            message=result.message, violations=[v.as_record() for v in result.violations])
        if result.status == "warn":  # pointed at the check's line in the spec file, not at this module
            warnings.warn_explicit(AttnCheckWarning(f"{self.nodeid} (severity warn)\n{result.message}"),
                                   AttnCheckWarning, filename=str(self.path), lineno=self.check.line)
        elif result.status == "fail":
            raise CheckFailed(result.message)

    def reportinfo(self):
        return self.path, self.check.line - 1, f"{self.spec.name}::layer{self.layer}::{self.name}"

    def base_record(self, status: str) -> CheckRecord:
        record = super().base_record(status)
        record.line, record.property = self.check.line, self.check.property
        record.severity, record.metric = self.check.params["severity"], self.check.params["metric"]
        return record


class BaselineItem(_SpecItem):
    kind = "baseline"

    def baseline_path(self) -> Path:
        return self.config.rootpath / self.spec.baseline_path(self.layer)

    def runtest(self) -> None:
        path = self.baseline_path()
        obtained = baseline_mod.layer_slice(self.dataset(), self.layer)
        tolerances = self.spec.baseline.tolerances
        self.outcome.update(status="fail", metric=", ".join(sorted(obtained.data_vars)))
        try:
            done = baseline_mod.check_baseline(
                obtained, path, tolerances, config=self.config,
                regen_command=f"pytest '{self.nodeid}'", cross_env=self.spec.baseline.cross_env,
                sigmas=self.spec.baseline.sigmas,
                spec_location=f"{self.spec.file}:{self.spec.baseline.line}",
            )
        except AssertionError as err:
            self.outcome["message"] = str(err)
            self._record_differences(path, obtained)
            raise CheckFailed(str(err)) from None
        except pytest.fail.Exception as err:  # written from this run (missing, or --force-regen)
            self.outcome["message"] = f"{err.msg}\nreview it and commit it; the next run compares against it"
            raise CheckFailed(self.outcome["message"]) from None
        self.outcome.update(status="pass", message=done.text(), baseline_file=done.file)
        if done.action != "compared":
            self.user_properties.append((baseline_mod.REGEN_PROPERTY, (done.action, _relative(done.file, self.config.rootpath), done.reason)))
        self._record_differences(done.file, obtained)
        self.outcome["expected"] = done.tolerance  # the tolerance that applied, and which kind

    def _record_differences(self, path: Path, obtained) -> None:
        """Per variable: cells beyond tolerance, the largest differences and where (results.json)."""
        try:
            expected = store.read_dataset(path)
        except HarnessError:
            return  # the message already says the baseline cannot be read
        tolerances = self.spec.baseline.tolerances
        diffs = baseline_mod.variable_differences(expected, obtained, tolerances)
        self.outcome["variables"] = diffs
        self.outcome["observed"] = "; ".join(
            f"{d.variable}: {d.beyond} of {d.cells} cells beyond ({d.share:.2%}), max |diff| {float(d.max_abs['value']):.3g}"
            for d in diffs
        )
        self.outcome["expected"] = "; ".join(
            f"{name}: |obtained - baseline| <= {tol.atol:g} + {tol.rtol:g} |baseline|"
            for name, tol in sorted(tolerances.items()) if name in obtained.data_vars
        )
        self.outcome["violations"] = [
            {"location": cell["location"], "observed": cell["obtained"], "expected": f"{d.variable} baseline {cell['baseline']}"}
            for d in diffs for cell in d.worst
        ]

    def reportinfo(self):
        return self.path, self.spec.baseline.line - 1, f"{self.spec.name}::layer{self.layer}::baseline"

    def base_record(self, status: str) -> CheckRecord:
        record = super().base_record(status)
        path = self.baseline_path()
        obtained = baseline_mod.obtained_file(path)
        record.line, record.property = self.spec.baseline.line, "baseline"
        record.metric = ", ".join(sorted(self.spec.baseline.tolerances))
        record.baseline = _relative(self.outcome.get("baseline_file", path), self.config.rootpath)
        record.obtained = _relative(obtained, self.config.rootpath) if obtained.is_file() else None
        record.regen_command = f"pytest '{self.nodeid}' --force-regen"
        return record


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
    outcome = item.outcome
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")  # the report's grouping says it was skipped
        if hasattr(report, "wasxfail"):
            reason = f"expected failure (xfail): {report.wasxfail}"
        status, message = "skip", reason
    elif report.failed and report.when == "setup":
        status, message = "error", str(report.longrepr)
    elif report.failed:
        status = "fail" if outcome.get("status") == "fail" else "error"
        message = outcome.get("message") or str(report.longrepr)
    else:
        status, message = outcome.get("status", "pass"), outcome.get("message", "")
    record = item.base_record(status)
    record.message = message
    record.duration_s = round(time.perf_counter() - item.started, 4) if item.started else 0.0
    for key in ("observed", "expected", "violations", "variables", "metric"):
        if key in outcome:
            setattr(record, key, outcome[key])
    # Reports travel from xdist workers as JSON-like data: plain dicts, rebuilt by the collector.
    report.attn_record = asdict(record)
    report.attn_spec = asdict(outcome["spec_entry"]) if "spec_entry" in outcome else None
    return report


class _Collector:
    """Gathers the records from reports (with xdist the controller sees reports, not items)."""

    def __init__(self, state: _State) -> None:
        self.state = state

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        record = getattr(report, "attn_record", None)
        if record is None:
            return
        results = Results.from_dict({"run": {}, "specs": [report.attn_spec] if report.attn_spec else [], "checks": [record]})
        self.state.records[record["nodeid"]] = results.checks[0]
        for spec in results.specs:
            self.state.specs.setdefault(spec.spec, spec)

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.state.report_path is not None:  # on its own line, also after -q's progress dots
            terminalreporter.ensure_newline()
            terminalreporter.write_line(f"attention report: {self.state.report_path}")


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
    results = Results(
        run=RunInfo(
            command=" ".join(["pytest", *config.invocation_params.args]),
            started=dt.datetime.fromtimestamp(state.started, dt.timezone.utc).isoformat(timespec="seconds"),
            duration_s=round(time.time() - state.started, 3),
            harness_version=attn_harness.__version__,
        ),
        specs=list(state.specs.values()),
        checks=sorted(state.records.values(), key=lambda r: r.nodeid),
    )
    if results_dir is not None:
        results.write(results_dir)
    if report_dir is not None:
        from attn_harness.report.html import render_run_report  # matplotlib: only when a report is wanted

        results.write(report_dir)
        state.report_path = render_run_report(results, report_dir)
