"""Fuzzing: mutated specs and command lines never give a traceback, never write outside the
places they may, and never let a bad value switch a failing check into a pass."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from attn_harness.cli import build_parser, main, probe_from_args
from attn_harness.core import checks
from attn_harness.core.errors import HarnessError
from attn_harness.core.probe import PROBE_FIELDS, Probe
from attn_harness.core.spec import SpecError, load_specs
from tests.test_checks import make_ds, structured_logits

BASE = {
    "name": "fuzz",
    "model": "tiny-random",
    "probe": {"seed": 1, "sample_steps": 4, "capture_steps": ["first", "last"], "guidance": 5.0, "shift": 3.0,
              "mask": "block-causal", "block_size": 3, "metrics": ["logits", "mass"]},
    "layers": {
        "0": [{"sink_heads": {"expected": [1], "threshold": 0.5}}],
        "1-2": [{"value_range": {"min": -1.0, "max": 1.0, "mostly": 1.0}}, {"row_stochastic": {"tol": 1e-4}}],
        "all": [{"diagonal_dominance": {"against": "mean", "margin": 0.1}}],
    },
    "baseline": {"logits": {"atol": 1e-4, "rtol": 1e-4}, "mass": {"atol": 1e-5}},
    "marks": [{"skipif": {"condition": "platform == 'plan9'", "reason": "x"}}],
}

NASTY = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, -1, 0, 1, 2**64, -(2**70), 1e308, True, None, "", "all",
                     "../../etc/passwd", "{layer.__class__}", "3-1", "first", [], [math.nan], {}, {"a": 1},
                     "__import__('os')", "x" * 20_000]),
    st.integers(), st.floats(), st.text(max_size=20),
    st.lists(st.one_of(st.integers(-5, 5000), st.sampled_from(["first", "mid", "last", "x"])), max_size=4),
)


def _paths(node, prefix=()):
    """Every (path, value) of the nested spec, leaves and containers."""
    yield prefix, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, (*prefix, index))


PATHS = [path for path, _ in _paths(BASE) if path]


def _mutated(path, value):
    spec = yaml.safe_load(yaml.safe_dump(BASE))
    node = spec
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return spec


def _non_finite(node) -> bool:
    return any(isinstance(v, float) and not math.isfinite(v) for _, v in _paths(node))


def _write(tmp_path: Path, spec) -> Path:
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump({"specs": [spec]}, allow_unicode=True), encoding="utf-8")
    return path


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(PATHS), value=NASTY)
def test_a_mutated_spec_loads_or_is_refused_with_located_lines(tmp_path, path, value):
    spec_file = _write(tmp_path, _mutated(path, value))
    try:
        (spec,) = load_specs(spec_file, display="fuzz.yaml")
    except SpecError as err:
        lines = str(err).splitlines()
        assert lines and all(line.startswith("fuzz.yaml:") and len(line) < 2000 for line in lines)
        return
    # accepted: then nothing that switches a comparison off got through
    values = [check.params for group in spec.groups for check in group.checks]
    values += [vars(tol) for tol in spec.baseline.tolerances.values()] if spec.baseline else []
    values.append(spec.probe.as_dict())
    assert not _non_finite(values), (path, value)
    assert isinstance(spec.probe, Probe)


FAILING = [  # (property, params) that fail on structured_logits (sink heads 0 and 2)
    ("sink_heads", {"expected": [1]}),
    ("sink_score", {"sign": "negative", "heads": [0]}),
    ("value_range", {"max": 1.0}),
    ("diagonal_dominance", {"margin": 5.0}),
]


@settings(max_examples=200, deadline=None)
@given(case=st.sampled_from(FAILING), key=st.sampled_from(["min", "max", "margin", "threshold", "tol", "mostly",
                                                           "sign", "heads", "steps", "severity", "metric"]),
       value=NASTY)
def test_a_bad_value_never_turns_a_failing_check_into_a_pass(case, key, value):
    """Adding or replacing one parameter with junk: refused, or the check still fails (or warns
    only when severity: warn was asked for)."""
    name, params = case
    ds = _FAILING_DS
    assert checks.run_check(ds, name, params).status == "fail"
    mutated = {**params, key: value}
    try:
        normalized = checks.normalize_params(name, mutated)
    except ValueError:
        return
    try:
        result = checks.run_check(ds, name, mutated)
    except HarnessError:
        return
    if result.status != "fail":
        # a legitimate change of meaning only: narrowing heads/steps/mostly/severity, or a value
        # that truly relaxes the bound; never a non-finite number
        assert math.isfinite(normalized.get(key, 0.0)) if isinstance(normalized.get(key), float) else True
        assert key in ("min", "max", "margin", "threshold", "mostly", "sign", "heads", "steps", "severity", "metric")


_FAILING_DS = make_ds(structured_logits())


# --------------------------------------------------------------------------- command lines

FLAGS = ["--" + (f.flag or "--" + k.replace("_", "-")).lstrip("-") for k, f in PROBE_FIELDS.items()]
ARG_VALUES = st.one_of(
    st.sampled_from(["nan", "inf", "-1", "0", "1", "3", "18446744073709551616", "", "all", "3-1", "0,0", "0-99999999",
                     "first", "mid,last", "rollout", "block-causal", "cuda:0", "cpu", "logits", "x" * 300]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12),
)


@settings(max_examples=300, deadline=None)
@given(pairs=st.lists(st.tuples(st.sampled_from([*FLAGS, "--layers"]), ARG_VALUES), max_size=4))
@example(pairs=[("--prompts", "\n")])  # found by this test: a file name is quoted, so the message stays one line
def test_extract_flags_give_a_probe_or_one_clear_error(pairs):
    argv = ["extract", "--model", "tiny-random", "--out", "x.nc"]
    for flag, value in pairs:
        argv += [f"{flag}={value}"]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:
        assert exit_.code == 2
        return
    try:
        probe = probe_from_args(args)
    except HarnessError as err:
        assert "\n" not in str(err) and len(str(err)) < 1000
        return
    assert not _non_finite(probe.as_dict())
    assert probe.mode != "rollout" or probe.mask == "block-causal"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-cli")
    argv = ["extract", "--model", "tiny-random", "--sample-steps", "2", "--layers", "0-1", "--no-progress",
            "--out", str(root / "a.nc")]
    assert main(argv) == 0
    return root


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


COMMANDS = st.sampled_from([
    ["stats", "a.nc"], ["stats", "a.nc", "--json"], ["compare", "a.nc", "a.nc"], ["import-legacy", "a.nc"],
])
OPTIONS = st.lists(st.tuples(st.sampled_from(["--layer", "--step", "--query-frames", "--out", "--layers", "--labels",
                                              "--metric", "--mask"]),
                             st.one_of(ARG_VALUES, st.sampled_from(["a.nc", "out/r.html", "out/x.nc", "out", "0", "1"]))),
                   max_size=4)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          phases=[Phase.explicit, Phase.reuse, Phase.generate])  # rendering is slow: no long shrinking
@given(command=COMMANDS, options=OPTIONS)
def test_commands_exit_0_or_2_and_write_only_their_outputs(workspace, monkeypatch, capsys, command, options):
    monkeypatch.chdir(workspace)
    before = _snapshot(workspace)
    argv = list(command)
    for flag, value in options:
        argv.append(f"{flag}={value}")
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse: a usage error
        code = exit_.code
    captured = capsys.readouterr()
    assert code in (0, 2), (argv, captured.err)
    assert "Traceback" not in captured.err
    if code == 2 and captured.err.startswith("attn-harness: error:"):
        assert len(captured.err.strip().splitlines()) == 1
    after = _snapshot(workspace)
    changed = {name for name in set(before) | set(after) if before.get(name) != after.get(name)}
    outputs = [str(Path(value)) for flag, value in options if flag == "--out" and value] + ["reports/compare.html"]
    allowed = [Path(out) for out in outputs]
    assert all(any(Path(name) == out or out in Path(name).parents for out in allowed) for name in changed), changed
    assert after["a.nc"] == before["a.nc"]  # an input is never overwritten
