"""A warm `pytest specs/` needs no torch: collection reads static facts and config files,
cache keys come from remembered file fingerprints, and a passing baseline is decided in
memory. The warm run's verdicts are the cold run's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

from attn_harness.core import catalog, store
from attn_harness.core.spec import DEFAULT_TOLERANCES, load_specs
from attn_harness.model import models
from attn_harness.pytest.baseline import check_baseline, layer_slice, matches_baseline, obtained_file
from attn_harness.sampling.cache import ExtractionCache, resolved_device
from tests.test_baseline import make_ds

REGISTERED = any(ep.name == "attn_harness" for ep in entry_points(group="pytest11"))
PLUGIN_ARGS = [] if REGISTERED else ["-p", "attn_harness.pytest.plugin"]
HEAVY = ("torch", "diffusers", "transformers", "accelerate")
# Loaded as the project's conftest: which heavy modules the session imported, written at its end.
PROBE = f"""\
import json, sys

def pytest_sessionfinish(session):
    with open("modules.json", "w") as handle:
        json.dump(sorted(m for m in {HEAVY!r} if m in sys.modules), handle)
"""
SPEC = """\
specs:
  - name: trained
    model: tiny-trained
    probe: {sample_steps: 2, capture_steps: [first, last]}
    layers:
      all:
        - row_stochastic
        - value_range: {min: -5, max: 15}
      0:
        - sink_heads: {expected: [1, 2], threshold: 0.4}
        - sink_heads: {id: wrong_heads, expected: [0], threshold: 0.4}
        - value_range: {id: warned, max: 0, severity: warn}
    baseline:
      layers: [1, 3]
"""
GPU_SPEC = """\
  - name: on-gpu
    model: tiny-trained
    marks: [gpu]
    layers:
      0:
        - row_stochastic
"""
RANDOM_SPEC = """\
  - name: random
    model: tiny-random
    probe: {sample_steps: 2, capture_steps: [last]}
    layers:
      all:
        - row_stochastic
"""
needs_cpu_build = pytest.mark.skipif(
    not catalog.cuda_ruled_out(), reason="a CUDA build of torch is asked whether a device is present (imports torch)"
)


@pytest.fixture
def project(tmp_path):
    """A spec project run by real `pytest` subprocesses, with its own extraction and fingerprint caches."""
    (tmp_path / "specs").mkdir()
    (tmp_path / "conftest.py").write_text(PROBE)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    env = {**os.environ, "ATTN_HARNESS_CACHE": str(tmp_path / "fingerprints")}

    def run(*args: str, cache: str = "cache") -> tuple[subprocess.CompletedProcess, list[str]]:
        cmd = [sys.executable, "-m", "pytest", *PLUGIN_ARGS, "-p", "no:cacheprovider", "--no-attn-report",
               "--attn-cache", str(tmp_path / cache), "specs", *args]
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
        assert done.returncode in (0, 1), done.stdout[-3000:] + done.stderr[-3000:]
        return done, json.loads((tmp_path / "modules.json").read_text())

    def verdicts(results_dir: str) -> dict[str, tuple]:
        checks = json.loads((tmp_path / results_dir / "results.json").read_text())["checks"]
        return {r["nodeid"]: (r["status"], r["observed"], r["expected"], r["violations"]) for r in checks}

    project.path, project.run, project.verdicts = tmp_path, run, verdicts
    return project


def write_baselines(spec_file: Path, root: Path) -> None:
    """The spec's baselines, from an extraction in this process (no extra `pytest` run)."""
    for spec in load_specs(spec_file):
        if spec.baseline is None or "gpu" in {mark.name for mark in spec.marks}:
            continue
        ds, _ = ExtractionCache(root / "first").load_or_extract(spec.model, spec.probe)
        for layer in spec.baseline_layers(None):
            store.write_dataset(layer_slice(ds, layer), root / spec.baseline_path(layer))


@needs_cpu_build
def test_a_warm_run_imports_no_torch_and_reports_the_cold_runs_verdicts(project):
    spec_file = project.path / "specs" / "mini.yaml"
    spec_file.write_text(SPEC + RANDOM_SPEC + GPU_SPEC)
    write_baselines(spec_file, project.path)
    cold, cold_modules = project.run("--attn-results", "cold")  # a fresh cache: extracts
    warm, warm_modules = project.run("--attn-results", "warm")
    assert "torch" in cold_modules  # the probe sees an extraction's imports
    assert warm_modules == []
    assert project.verdicts("warm") == project.verdicts("cold")
    statuses = [v[0] for v in project.verdicts("warm").values()]
    assert {"pass", "fail", "warn", "skip"} <= set(statuses)  # the comparison covers every kind of verdict
    assert statuses.count("pass") >= 10 and "1 failed" in warm.stdout and "1 failed" in cold.stdout
    assert len(ExtractionCache(project.path / "cache").extractions()) == 2  # the warm run extracted nothing
    skipped = json.loads((project.path / "warm" / "results.json").read_text())["checks"]
    assert any("is marked gpu and no CUDA device is present" in r["message"] for r in skipped if r["status"] == "skip")


def test_collection_reads_layer_counts_without_torch(project):
    (project.path / "specs" / "mini.yaml").write_text(SPEC + RANDOM_SPEC)
    done, modules = project.run("--collect-only", "-q")
    assert modules == []
    assert "specs/mini.yaml::random::layer3::row_stochastic" in done.stdout  # 'all' expanded to 4 layers
    assert "specs/mini.yaml::trained::layer3::baseline" in done.stdout
    assert not (project.path / "cache").exists() or not list((project.path / "cache").glob("*.nc"))


# ---------------------------------------------------------------- static facts, without torch


def test_the_catalog_names_the_embedded_models_the_model_layer_loads():
    assert catalog.EMBEDDED_NAMES == tuple(models.EMBEDDED)


@pytest.mark.parametrize("name", ["tiny-random", "tiny-trained", "tiny-trained-causal"])
def test_catalog_layer_counts_match_the_loaded_models(name):
    assert catalog.num_layers(name) == models.load_model(name).config["num_layers"] == 4


def test_a_checkpoint_file_has_no_config_so_its_count_comes_from_its_weights(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "gen.safetensors"
    save_file({f"blocks.{i}.self_attn.q.weight": torch.zeros(2, 2) for i in range(3)}, path)
    assert catalog.num_layers(path) is None
    assert models.num_layers(path) == 3


def test_a_built_models_identity_changes_with_what_decides_its_weights(monkeypatch):
    identity = catalog.source_identity("tiny-random")
    assert identity == catalog.built_identity("tiny-random") and f"torch {torch.__version__}" in identity
    monkeypatch.setitem(catalog.TINY_CONFIG, "num_layers", 5)  # another architecture: another key
    changed_config = catalog.source_identity("tiny-random")
    monkeypatch.setattr(catalog, "TINY_SEED", 1)  # another seed: another key
    assert len({identity, changed_config, catalog.source_identity("tiny-random")}) == 3


def test_an_embedded_fixtures_identity_is_its_weight_files_fingerprint():
    files = catalog.weight_files("tiny-trained")
    assert [p.name for p in files] == ["diffusion_pytorch_model.safetensors"]
    assert catalog.source_identity("tiny-trained") == models.load_model("tiny-trained").fingerprint


def test_cpu_and_auto_on_a_cpu_build_resolve_without_torch_as_torch_would():
    assert resolved_device("cpu") == "cpu"
    if catalog.cuda_ruled_out():
        assert resolved_device("auto") == "cpu" == str(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def _fake_torch(tmp_path: Path, cuda: str) -> str:
    package = tmp_path / "torch"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('torch was imported')\n")
    (package / "version.py").write_text(f"from typing import Optional\ncuda: Optional[str] = {cuda}\nhip: Optional[str] = None\n")
    probe = "from attn_harness.core.catalog import cuda_ruled_out; print(cuda_ruled_out())"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(__file__).resolve().parents[1])])}
    return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout.strip()


def test_cuda_is_ruled_out_from_the_torch_build_file_without_importing_torch(tmp_path):
    assert _fake_torch(tmp_path / "cpu", "None") == "True"
    assert _fake_torch(tmp_path / "cuda", "'12.4'") == "False"  # a CUDA build: torch must be asked


# ---------------------------------------------------------------- a passing baseline, in memory


def test_a_matching_baseline_is_decided_in_memory_and_writes_nothing(tmp_path, pytestconfig):
    path = tmp_path / "layer3.nc"
    ds = layer_slice(make_ds(), 3)
    store.write_dataset(ds, path)
    obtained_file(path).write_bytes(b"left by an earlier failing run")
    before = path.stat().st_mtime_ns
    assert matches_baseline(ds, path, DEFAULT_TOLERANCES, config=pytestconfig)
    check_baseline(ds, path, DEFAULT_TOLERANCES, config=pytestconfig, regen_command="pytest x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer3.nc"] and path.stat().st_mtime_ns == before


def test_a_difference_or_a_missing_baseline_is_not_a_match(tmp_path, pytestconfig):
    path = tmp_path / "layer3.nc"
    ds = layer_slice(make_ds(), 3)
    assert not matches_baseline(ds, path, DEFAULT_TOLERANCES, config=pytestconfig)
    store.write_dataset(ds, path)
    changed = ds.copy(deep=True)
    changed["logits"][dict(step=0, layer=0, head=0, query_frame=0, key_frame=0)] += 1.0
    assert not matches_baseline(changed, path, DEFAULT_TOLERANCES, config=pytestconfig)
    path.write_text("not netcdf")
    assert not matches_baseline(ds, path, DEFAULT_TOLERANCES, config=pytestconfig)
