"""pytest plugin: collect attention spec files into one item per (spec, layer, property) and
one baseline item per (spec, layer).

Registered through the ``pytest11`` entry point ``attn_harness``, so it loads in every pytest
run of the environment; it stays in its lane. It claims only spec files: a ``.yaml``/``.yml``
whose content is a harness spec (a top-level ``specs:`` list), a path under the ini option
``attn_specs``, or a file named on the command line; every other file is left alone. Importing
it costs only pytest and the standard library: the spec loader, xarray and torch are imported
when a spec file is collected.

Node ids read ``specs/tiny_default.yaml::tiny-default::layer3::sink_score``. Items of one spec
share one extraction, cached on disk (``attn_harness.sampling.cache``). ``--attn-strict`` (ini
``attn_strict``) makes an unavailable model, environment variable or CUDA device a collection
error instead of a skip. ``--attn-results DIR`` writes ``DIR/results.json`` (one record per
item) at the end of the run, then renders the HTML report. ``--force-regen`` and
``--regen-all`` come from pytest-regressions, whose semantics the baseline items follow.
"""

from __future__ import annotations

import datetime as dt
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from attn_harness.core.errors import HarnessError
from attn_harness.core.results import CheckRecord, Results, RunInfo, SpecInfo  # stdlib only
from attn_harness.pytest.regen import REGEN_PROPERTY, RegenSummary

if TYPE_CHECKING:
    from attn_harness.core.probe import Probe
    from attn_harness.core.spec import PropertyCheck, Spec
    from attn_harness.sampling.cache import ExtractionCache

SPEC_SUFFIXES = (".yaml", ".yml")
DEFAULT_CACHE_DIR = ".attn-cache"  # attn_harness.sampling.cache.DEFAULT_DIR, without importing xarray here
SNIFF_BYTES = 65536  # how much of a YAML file is read to decide whether it is a spec file
SPEC_TOP_KEY = re.compile(r"(?m)^specs[ \t]*:")
SPEC_ENTRY_KEY = re.compile(r"(?m)^[ \t]*(?:-[ \t]+)?(?:model|layers)[ \t]*:")


class AttnCheckWarning(UserWarning):
    """A failing property with ``severity: warn``."""


class CheckFailed(Exception):
    """A property or baseline that does not hold; reported as its message, without traceback."""


@dataclass
class _State:
    """Per-process state: the cache (made on first use) and the extractions already loaded."""

    cache_dir: Path
    strict: bool = False
    started: float = field(default_factory=time.time)
    loaded: dict[str, Any] = field(default_factory=dict)  # spec key -> (ds, path) or HarnessError
    records: dict[str, CheckRecord] = field(default_factory=dict)  # nodeid -> record (controller)
    specs: dict[str, SpecInfo] = field(default_factory=dict)  # spec name -> spec entry (controller)
    report_path: Path | None = None
    remote: Any = None  # attn_harness.pytest.distributed.RemoteExtractions under --attn-scheduler
    spec_names: dict[str, str] = field(default_factory=dict)  # spec name -> "file:line" that defines it
    baseline_files: dict[Path, str] = field(default_factory=dict)  # baseline file -> the node using it
    _cache: Any = None

    @property
    def cache(self) -> ExtractionCache:
        if self._cache is None:
            from attn_harness.sampling.cache import ExtractionCache  # xarray: only when a spec runs

            self._cache = ExtractionCache(self.cache_dir)
        return self._cache

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
                    help=f"extraction cache directory (default: {DEFAULT_CACHE_DIR} under the rootdir)")
    group.addoption("--attn-cache-clear", action="store_true", default=False,
                    help="remove the extraction cache's entries before the run (only files the harness wrote)")
    group.addoption("--attn-results", metavar="DIR", default=None,
                    help="also write DIR/results.json with every check of the run")
    group.addoption("--attn-report", metavar="DIR", default=None,
                    help="write the HTML report to DIR/index.html (default: reports/latest under the rootdir)")
    group.addoption("--no-attn-report", action="store_true", default=False,
                    help="do not write the HTML report")
    group.addoption("--attn-scheduler", metavar="ADDR|local:N", default=None,
                    help="run the specs' extractions as tasks on a Dask cluster (local:N starts one here)")
    group.addoption("--attn-strict", action="store_true", default=None,
                    help="an unavailable model, environment variable or CUDA device is an error, not a skip "
                    "(for CI; default: the ini option attn_strict, else false)")
    parser.addini("attn_strict", type="bool", default=False,
                  help="attn-harness: treat an unavailable model, environment variable or CUDA device as an error")
    parser.addini("attn_specs", type="paths", default=[],
                  help="attn-harness: spec files or directories whose .yaml/.yml files are always collected as specs")


def _directory_option(config: pytest.Config, name: str, default: Path | None) -> Path | None:
    """An output directory option; a path that exists and is not a directory is a usage error."""
    value = config.getoption(name)
    if value is None:
        return default
    path = Path(value)
    path = path if path.is_absolute() else Path(config.invocation_params.dir) / path
    if path.exists() and not path.is_dir():
        raise pytest.UsageError(f"--{name.replace('_', '-')} {value}: is a file; give a directory")
    return path


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped when none is present")
    config.addinivalue_line("markers", "slow: a long extraction (deselect with -m 'not slow')")
    strict = config.getoption("attn_strict")
    state = _State(
        cache_dir=_directory_option(config, "attn_cache", config.rootpath / DEFAULT_CACHE_DIR),
        strict=bool(config.getini("attn_strict") if strict is None else strict),
    )
    _directory_option(config, "attn_results", None)
    _directory_option(config, "attn_report", None)
    if config.getoption("attn_cache_clear") and not hasattr(config, "workerinput"):
        try:
            state.cache.clear()
        except HarnessError as err:
            raise pytest.UsageError(f"--attn-cache-clear: {err}") from None
    config.stash[_STATE] = state
    if not hasattr(config, "workerinput"):
        config.pluginmanager.register(_Collector(state), "attn-harness-results")
        config.pluginmanager.register(RegenSummary(), "attn-harness-regen-summary")


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


def _named_on_command_line(file_path: Path, config: pytest.Config) -> bool:
    start = Path(config.invocation_params.dir)
    for arg in config.args:
        path = Path(str(arg).split("::")[0])
        path = path if path.is_absolute() else start / path
        if path.suffix in SPEC_SUFFIXES and path.resolve() == file_path.resolve():
            return True
    return False


def _under_ini_paths(file_path: Path, config: pytest.Config) -> bool:
    resolved = file_path.resolve()
    for entry in config.getini("attn_specs"):
        entry = Path(entry).resolve()
        if resolved == entry or entry in resolved.parents:
            return True
    return False


def looks_like_spec(file_path: Path) -> bool:
    """Whether a YAML file's text is a harness spec: a top-level ``specs:`` with ``model``/``layers`` keys."""
    try:
        with open(file_path, "rb") as handle:
            head = handle.read(SNIFF_BYTES).decode("utf-8", errors="replace")
    except OSError:
        return False
    return bool(SPEC_TOP_KEY.search(head) and SPEC_ENTRY_KEY.search(head))


def is_spec_file(file_path: Path, config: pytest.Config) -> bool:
    """The plugin's claim: a spec by content, a path under ``attn_specs``, or a file named on the command line."""
    if file_path.suffix not in SPEC_SUFFIXES:
        return False
    return _under_ini_paths(file_path, config) or _named_on_command_line(file_path, config) or looks_like_spec(file_path)


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if is_spec_file(file_path, parent.config):
        return SpecFile.from_parent(parent, path=file_path)
    return None


class SpecFile(pytest.File):
    """A YAML spec file; its mistakes are one collection error, each with file:line and key."""

    def collect(self):
        from attn_harness.core.spec import SpecError, load_specs  # yaml and the property library

        display = self.nodeid or self.path.name
        try:
            specs = load_specs(self.path, display=display)
        except SpecError as err:
            raise self.CollectError(str(err)) from None
        state = self.config.stash[_STATE]
        clashes = []
        for spec in specs:
            where = f"{spec.file}:{spec.line}"
            first = state.spec_names.setdefault(spec.name, where)
            if first != where:
                clashes.append(f"{where}: spec name {spec.name!r} is also defined at {first}: names must be unique "
                               "in a run (they name the tests and the baseline files); rename one")
        if clashes:
            raise self.CollectError("\n".join(clashes))
        for spec in specs:
            yield SpecNode.from_parent(self, name=spec.name, spec=spec)


def _num_layers(source: str) -> int:
    """How many transformer blocks the model has (to expand ``all``), from its config without
    torch; only a training checkpoint file (no config) is opened with torch."""
    from attn_harness.core import catalog

    known = catalog.num_layers(source)
    if known is not None:
        return known
    from attn_harness.model.models import num_layers

    return num_layers(source)


def _cuda_available() -> bool:
    """torch.cuda.is_available(), without importing torch when its build has no CUDA."""
    from attn_harness.core import catalog

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
        from attn_harness.core.spec import resolve_model

        spec = self.spec
        state = self.config.stash[_STATE]
        self._apply_marks(state.strict)
        root = self.config.rootpath
        source, reason = resolve_model(spec.model, embedded=_embedded_names(), root=root)
        if spec.base_model and not reason:
            self.base_model, reason = resolve_model(spec.base_model, embedded=_embedded_names(), root=root)
        if spec.probe.prompt_embeds and not reason:
            embeds, reason = resolve_model(spec.probe.prompt_embeds, embedded=(), root=root)
            self.probe = spec.probe.replace(prompt_embeds=embeds)
        if not reason and spec.probe.device.startswith("cuda") and not _cuda_available():
            reason = f"probe device {spec.probe.device!r} needs CUDA and no CUDA device is present"
        self.source = source
        if reason:
            self._unavailable(reason, state.strict)
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
            with_baseline = layer in baseline_layers
            if with_baseline and layer != "all":
                self._claim_baseline(state, layer)
            yield LayerNode.from_parent(
                self, name=f"layer{layer}", layer=layer, checks=by_layer.get(layer, []), with_baseline=with_baseline,
            )

    def _unavailable(self, reason: str, strict: bool) -> None:
        """Skip with ``reason``, or (strict) fail collection with it: a missing model must not pass CI."""
        where = f"{self.spec.file}:{self.spec.line}: spec {self.spec.name!r}"
        if strict:
            raise self.CollectError(f"{where}: {reason} (--attn-strict: an unavailable model, variable or device "
                                    "is an error; unset attn_strict to skip instead)")
        self.add_marker(pytest.mark.skip(reason=f"spec {self.spec.name!r}: {reason}"))

    def _claim_baseline(self, state: _State, layer: int) -> None:
        try:
            path = baseline_file(self.config.rootpath, self.spec, layer)
        except HarnessError as err:
            raise self.CollectError(f"{self.spec.file}:{self.spec.baseline.line}: {err}") from None
        node = f"{self.nodeid}::layer{layer}"
        first = state.baseline_files.setdefault(path, node)
        if first != node:
            raise self.CollectError(f"{self.spec.file}:{self.spec.baseline.line}: baseline file {path} is also used "
                                    f"by {first}; give the specs distinct names or baseline.file templates")

    def _apply_marks(self, strict: bool) -> None:
        from attn_harness.core import conditions

        for mark in self.spec.marks:
            if mark.name in ("gpu", "slow"):
                self.add_marker(getattr(pytest.mark, mark.name))
                if mark.name == "gpu" and not _cuda_available():
                    self._unavailable("it is marked gpu and no CUDA device is present (torch.cuda.is_available() is False)",
                                      strict)
            elif mark.name == "skipif":
                try:
                    holds = conditions.evaluate(mark.kwargs["condition"])
                except conditions.ConditionError as err:
                    raise self.CollectError(f"{self.spec.file}:{mark.line}: marks.skipif.condition: {err}") from None
                reason = f"{mark.kwargs['reason']} (skipif: {mark.kwargs['condition']})"
                self.add_marker(pytest.mark.skipif(holds, reason=reason))
            else:
                self.add_marker(pytest.mark.xfail(**mark.kwargs))


def _embedded_names() -> tuple[str, ...]:
    from attn_harness.core import catalog

    return catalog.EMBEDDED_NAMES


def baseline_file(root: Path, spec: Spec, layer: int | str) -> Path:
    """The baseline file of ``spec``'s ``layer``, checked to lie inside ``<root>/baselines``.

    The spec loader already refuses absolute paths, ``..`` and fields other than ``{spec}``
    and ``{layer}``; this also catches a symlink in the tree that points elsewhere.
    """
    from attn_harness.core.spec import BASELINES_DIR

    directory = (root / BASELINES_DIR).resolve()
    path = (root / spec.baseline_path(layer)).resolve()
    if directory not in path.parents:
        raise HarnessError(f"baseline file {spec.baseline_path(layer)} resolves to {path}, outside {directory}; "
                           "baselines are written only inside the baselines directory")
    return path


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
        from attn_harness.core.schema import provenance_keys  # xarray: only when a spec runs

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
        from attn_harness.core import checks

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
        return baseline_file(self.config.rootpath, self.spec, self.layer)

    def runtest(self) -> None:
        from attn_harness.pytest import baseline as baseline_mod

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
            self.user_properties.append((REGEN_PROPERTY, (done.action, _relative(done.file, self.config.rootpath), done.reason)))
        self._record_differences(done.file, obtained, done.data)
        self.outcome["expected"] = done.tolerance  # the tolerance that applied, and which kind

    def _record_differences(self, path: Path, obtained, expected=None) -> None:
        """Per variable: cells beyond tolerance, the largest differences and where (results.json);
        ``expected``: the baseline's data when the comparison already read it."""
        from attn_harness.core import store
        from attn_harness.pytest import baseline as baseline_mod

        try:
            expected = store.read_dataset(path) if expected is None else expected
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
        from attn_harness.pytest import baseline as baseline_mod

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
    """Write the results and the report; a failed write (disk full, ...) is one line and a failed run."""
    try:
        _write_outputs(session)
    except HarnessError as err:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"attn-harness: error: {err}", red=True)
        if session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _write_outputs(session: pytest.Session) -> None:
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
            harness_version=_version(),
        ),
        specs=list(state.specs.values()),
        checks=sorted(state.records.values(), key=lambda r: r.nodeid),
    )
    if results_dir is not None:
        results.write(results_dir)
    if report_dir is not None:
        from attn_harness.report.html import render_run_report  # matplotlib: only when a report is wanted

        results.write(report_dir)
        loaded = {str(path): ds for found in state.loaded.values() if not isinstance(found, HarnessError) for ds, path in [found]}
        state.report_path = render_run_report(results, report_dir, loaded)


def _version() -> str:
    from attn_harness import __version__

    return __version__
