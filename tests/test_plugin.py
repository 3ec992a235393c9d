"""`pytest specs/` end to end: collection, ids, failures, baselines and regeneration, xdist,
skips and the results JSON, run through pytester on the embedded tiny model."""

from __future__ import annotations

import json
import textwrap
from importlib.metadata import entry_points

import pytest
import torch

from attn_harness.core import store
from attn_harness.core.results import Results

pytest_plugins = ["pytester"]

# Once installed with its pytest11 entry point the plugin loads by itself; before that, ask for it.
REGISTERED = any(ep.name == "attn_harness" for ep in entry_points(group="pytest11"))
PLUGIN_ARGS = [] if REGISTERED else ["-p", "attn_harness.pytest.plugin"]

SPEC = """\
specs:
  - name: mini
    model: tiny-random
    probe:
      sample_steps: 2
      capture_steps: [first]
    layers:
      0-1:
        - value_range: {min: -5, max: 5}
      3:
        - sink_heads: {expected: [0, 2]}
    baseline:
      layers: [3]
"""


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One extraction cache for the module: the tiny model is extracted once, not per test."""
    return tmp_path_factory.mktemp("attn-cache")


@pytest.fixture
def project(pytester, shared_cache):
    pytester.makeini("[pytest]\n")
    (pytester.path / "specs").mkdir()

    def write(text: str = SPEC, name: str = "mini.yaml"):
        path = pytester.path / "specs" / name
        path.write_text(textwrap.dedent(text))
        return path

    def run(*args: str, cache=shared_cache):
        # A subprocess per run: a real `pytest specs/` session each time, nothing shared but the cache.
        argv = [*PLUGIN_ARGS, "-p", "no:cacheprovider", "--attn-cache", str(cache), "specs", *args]
        return pytester.runpytest_subprocess(*argv)

    project.write, project.run = write, run
    return project


def test_items_have_readable_ids_and_a_missing_baseline_is_written_then_passes(project, pytester):
    project.write()
    result = project.run("-v")
    result.stdout.fnmatch_lines([
        "specs/mini.yaml::mini::layer0::value_range PASSED*",
        "specs/mini.yaml::mini::layer1::value_range PASSED*",
        "specs/mini.yaml::mini::layer3::sink_heads PASSED*",
        "specs/mini.yaml::mini::layer3::baseline FAILED*",
        "*baseline */baselines/mini/layer3.nc did not exist: created from this run (environment cpu-float32)*",
    ])
    assert (pytester.path / "baselines" / "mini" / "layer3.nc").is_file()
    project.run().assert_outcomes(passed=4)


def test_reportinfo_points_at_the_yaml_line(project, pytester):
    project.write(SPEC.replace("{expected: [0, 2]}", "{expected: [1]}"))
    result = project.run("-rf", "--junitxml=report.xml", "-o", "junit_family=xunit1")  # xunit1 keeps file:line
    result.stdout.fnmatch_lines(["FAILED specs/mini.yaml::mini::layer3::sink_heads*"])
    xml = (pytester.path / "report.xml").read_text()
    assert 'line="10"' in xml  # junit lines are 0-based: YAML line 11


def test_wrong_expectation_names_the_head_and_query_frames(project):
    project.write(SPEC.replace("{expected: [0, 2]}", "{expected: [0, 1, 2]}"))
    result = project.run()
    result.stdout.fnmatch_lines(["sink_heads on logits: 1 of 4 heads violate*"])
    assert "(sink score over query_frames=[6, 7, 8]), expected > 0 (listed sink head lost its sink)" in result.stdout.str()
    assert "    step=0 layer=3 head=1: " in result.stdout.str()
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_mistyped_spec_fails_collection_with_file_line_and_key(project):
    project.write(SPEC.replace("- sink_heads:", "- sink_head:"))
    result = project.run()
    result.stdout.fnmatch_lines([
        "*ERROR collecting specs/mini.yaml*",
        "specs/mini.yaml:11: unknown key 'sink_head' in layers?3? (did you mean 'sink_heads'?)*",
    ])
    assert "INTERNALERROR" not in result.stdout.str() and "Traceback" not in result.stdout.str()
    assert result.ret == pytest.ExitCode.INTERRUPTED


def test_perturbed_baseline_fails_with_named_diff_and_regen_flags(project, pytester):
    project.write()
    project.run("--regen-all").assert_outcomes(passed=4)
    baseline = pytester.path / "baselines" / "mini" / "layer3.nc"
    ds = store.read_dataset(baseline)
    ds["logits"][dict(step=0, layer=0, head=2, query_frame=4, key_frame=1)] += 0.25
    store.write_dataset(ds, baseline)

    result = project.run("-q", "--attn-results", "out")
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines([
        "*logits: 1 of 324 cells differ (0.31%) beyond atol=0.0001 rtol=0.0001",
        "*max abs diff 0.25 at step=0 layer=3 head=2 query_frame=4 key_frame=1*",
        "*pytest 'specs/mini.yaml::mini::layer3::baseline' --force-regen (writes */baselines/mini/layer3.nc)",
    ])
    assert (baseline.parent / "layer3.obtained.nc").is_file()
    report = pytester.path / "reports" / "latest" / "index.html"
    assert f"attention report: {report}" in result.stdout.lines  # its own line, not after the dots
    record = next(r for r in json.loads((pytester.path / "out" / "results.json").read_text())["checks"]
                  if r["kind"] == "baseline")
    assert record["metric"] == "logits, mass" and record["status"] == "fail"  # both variables were compared
    logits, mass = record["variables"]
    assert (mass["variable"], mass["beyond"]) == ("mass", 0)
    assert (logits["variable"], logits["beyond"], logits["cells"]) == ("logits", 1, 324)
    assert logits["share"] == pytest.approx(1 / 324)
    assert logits["max_abs"]["value"] == pytest.approx(0.25, rel=1e-5)
    assert logits["max_abs"]["location"] == {"step": 0, "layer": 3, "head": 2, "query_frame": 4, "key_frame": 1}
    assert record["violations"][0]["location"] == logits["max_abs"]["location"]
    assert record["observed"].startswith("logits: 1 of 324 cells beyond (0.31%), max |diff| 0.25")

    project.run("--force-regen").assert_outcomes(passed=3, failed=1)  # rewritten, still fails this run
    assert not (baseline.parent / "layer3.obtained.nc").exists()
    project.run().assert_outcomes(passed=4)
    project.run("--regen-all").assert_outcomes(passed=4)


def test_xdist_gives_the_same_results_with_one_extraction(project, pytester, tmp_path):
    project.write()
    project.run("--regen-all").assert_outcomes(passed=4)
    fresh_cache = tmp_path / "fresh"
    result = project.run("-n", "2", "--attn-results", "out", cache=fresh_cache)
    result.assert_outcomes(passed=4)
    log = (fresh_cache / "extractions.log").read_text().splitlines()
    assert len(log) == 1
    records = json.loads((pytester.path / "out" / "results.json").read_text())["checks"]
    assert [r["nodeid"] for r in records] == [
        "specs/mini.yaml::mini::layer0::value_range",
        "specs/mini.yaml::mini::layer1::value_range",
        "specs/mini.yaml::mini::layer3::baseline",
        "specs/mini.yaml::mini::layer3::sink_heads",
    ]


def test_results_json_records_every_check(project, pytester):
    project.write(SPEC.replace("{expected: [0, 2]}", "{expected: [0, 1, 2], severity: warn}"))
    result = project.run("--regen-all", "--attn-results", "out")
    result.assert_outcomes(passed=4, warnings=1)
    result.stdout.fnmatch_lines(["*specs/mini.yaml:11: AttnCheckWarning: *layer3::sink_heads (severity warn)"])
    results = json.loads((pytester.path / "out" / "results.json").read_text())
    assert set(results["run"]) == {"command", "started", "duration_s", "harness_version"}
    (spec,) = results["specs"]
    assert spec["spec"] == "mini" and spec["provenance"]["model_id"] == "tiny-random"
    sink = next(r for r in results["checks"] if r["property"] == "sink_heads")
    assert sink["status"] == "warn" and sink["severity"] == "warn" and sink["line"] == 11
    assert sink["violations"][0]["location"] == {"step": 0, "layer": 3, "head": 1}
    base = next(r for r in results["checks"] if r["kind"] == "baseline")
    assert base["status"] == "pass" and base["baseline"] == "baselines/mini/layer3.nc"
    assert [(v["variable"], v["beyond"]) for v in base["variables"]] == [("logits", 0), ("mass", 0)]
    Results.from_dict(results)  # the typed record reads its own output back


def test_missing_checkpoint_env_var_and_gpu_mark_skip_with_reason(project, monkeypatch):
    monkeypatch.delenv("ATTN_TEST_CKPT", raising=False)
    project.write("""\
        specs:
          - name: real
            model: ${ATTN_TEST_CKPT}
            layers:
              20:
                - sink_heads: {expected: [3]}
          - name: on-gpu
            model: tiny-random
            marks: [gpu]
            layers:
              0:
                - value_range: {max: 5}
        """)
    result = project.run("-rs")
    result.stdout.fnmatch_lines(["*environment variable ATTN_TEST_CKPT is not set*"])
    import torch

    if not torch.cuda.is_available():
        result.stdout.fnmatch_lines(["*'on-gpu': it is marked gpu and no CUDA device is present*"])
        result.assert_outcomes(skipped=2)


CHECKPOINT_SPEC = """\
specs:
  - name: ar-checkpoint
    model: ckpt/self_forcing_step100.pt
    probe:
      sample_steps: 2
      capture_steps: [last]
      mask: block-causal
      prompt_embeds: ckpt/prompt_embeds.pt
      metrics: [logits, mass]
    layers:
      all:
        - causal
        - causal: {id: causal_logits, metric: logits}
        - row_stochastic
"""


def test_block_causal_spec_runs_against_a_training_checkpoint_file(project, pytester):
    """An autoregressive trainer's .pt (generator_ema, model. prefix, original keys) as a spec's model."""
    from attn_harness.model.models import build_tiny_random
    from tests.test_layouts import to_original

    state = {k: v.detach().clone() for k, v in build_tiny_random().state_dict().items()}
    (pytester.path / "ckpt").mkdir()
    ema = {f"model.{k}": v for k, v in to_original(state).items()}
    torch.save({"generator_ema": ema}, pytester.path / "ckpt" / "self_forcing_step100.pt")
    gen = torch.Generator().manual_seed(0)
    embeds = {"prompt_embeds": torch.randn(1, 16, 64, generator=gen), "negative_prompt_embeds": torch.zeros(1, 16, 64)}
    torch.save(embeds, pytester.path / "ckpt" / "prompt_embeds.pt")
    project.write(CHECKPOINT_SPEC, name="ar.yaml")
    result = project.run("--attn-results", "out", "-v")
    result.assert_outcomes(passed=12)
    record = json.loads((pytester.path / "out" / "results.json").read_text())["specs"][0]
    assert record["provenance"]["checkpoint_layout"] == "training-checkpoint"
    assert record["provenance"]["mask"] == "block-causal"


def test_a_layer_the_model_lacks_fails_pointing_at_the_spec(project):
    project.write("""\
specs:
  - name: mini
    model: tiny-random
    probe: {sample_steps: 2}
    layers:
      40:
        - row_stochastic
""")
    result = project.run()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["specs/mini.yaml:2: spec 'mini': layer(s) [[]40[]] out of range: this model has 4 layers (0-3)"])
