"""Sweeps on a real Dask cluster (nanny-managed worker processes on this machine).

Exactness: a sweep's part is the same extraction code on the same CPU with one torch
thread, so the tests compare it with the sequential extraction (also run with one torch
thread) for exact equality. Equality across thread counts is not asserted: the order of a
matmul's partial sums may depend on how many threads split it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import xarray as xr

from attn_harness.cli import main
from attn_harness.core.errors import HarnessError
from attn_harness.core.probe import Probe
from attn_harness.core.spec import load_specs
from attn_harness.core.sweep_dataset import merge_parts, part_view, read_sweep, training_step_from_name
from attn_harness.sampling import sweep as sw
from attn_harness.sampling.extract import extract

distributed = pytest.importorskip("distributed")

MODELS = ["tiny-random", "tiny-trained", "tiny-trained-causal"]
PROMPTS = ["a red square moving from left to right", "a blue blob moving up"]
SEEDS = [0, 7]
PROBE = Probe(sample_steps=3, capture_steps=("first", "last"), device="cpu")


@pytest.fixture
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cluster():
    """Two single-threaded workers shared by the tests below (the address of their scheduler)."""
    with sw.connect("local:2", threads=1, gpus=0) as (client, _):
        yield client


def log_events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / sw.LOG_NAME).read_text().splitlines()]


def done_keys(events: list[dict]) -> list[str]:
    return [e["key"] for e in events if e["event"] == "done"]


def test_sweep_on_two_workers_equals_the_sequential_extractions(tmp_path, one_torch_thread):
    out = tmp_path / "sweep"
    ds = sw.sweep(MODELS, PROMPTS, SEEDS, PROBE, out=out, scheduler="local:2", threads=1, progress=False)
    assert dict(ds.sizes) == {"checkpoint": 3, "prompt": 2, "seed": 2, "step": 2, "layer": 4, "head": 4,
                              "query_frame": 9, "key_frame": 9}
    stored = read_sweep(out / sw.MERGED_NAME)
    assert list(stored["checkpoint_source"].values) == MODELS and list(stored["prompt_text"].values) == PROMPTS
    assert list(stored["seed"].values) == SEEDS
    assert len({e["pid"] for e in log_events(out)}) == 2, "both workers extracted"
    for c, model in enumerate(MODELS):
        for p, prompt in enumerate(PROMPTS):
            for s, seed in enumerate(SEEDS):
                reference = extract(model, PROBE.replace(prompt=prompt, seed=seed), progress=False)
                cell = part_view(stored, checkpoint=c, prompt=p, seed=seed)
                for metric in ("logits", "mass"):
                    xr.testing.assert_identical(cell[metric], reference[metric])
                differing = {k for k in reference.attrs if reference.attrs[k] != cell.attrs.get(k)}
                assert differing == {"created"}, differing


def test_a_worker_killed_mid_extraction_loses_and_duplicates_nothing(cluster, tmp_path):
    out = tmp_path / "sweep"
    plan = sw.plan_sweep(MODELS[1:2], PROMPTS, SEEDS, PROBE)
    seen, killed = [], None
    for part in sw.run_parts(cluster, plan.unique(), out, progress=False):
        seen.append(part.key)
        if killed is None:
            killed = _kill_a_worker_mid_extraction(out)
    assert sorted(seen) == sorted(p.key for p in plan.parts), "every part arrived exactly once"
    events = log_events(out)
    assert sorted(done_keys(events)) == sorted(seen), "each part written once"
    assert [e["key"] for e in events if e["event"] == "start"].count(killed) == 2, "the killed part was rerun"
    assert sorted(p.stem for p in (out / sw.PARTS_DIR).glob("*.nc")) == sorted(seen)
    merged = sw.merge(plan, out)
    assert merged.sizes["checkpoint"] * merged.sizes["prompt"] * merged.sizes["seed"] == len(seen)


def _kill_a_worker_mid_extraction(out: Path, timeout: float = 120.0) -> str:
    """SIGKILL the worker process of a part that has started and not finished; return its key."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = log_events(out)
        finished = set(done_keys(events))
        running = [e for e in events if e["event"] == "start" and e["key"] not in finished]
        if running:
            os.kill(running[-1]["pid"], signal.SIGKILL)
            return running[-1]["key"]
        time.sleep(0.05)
    raise AssertionError("no part was running to kill")


def test_an_interrupted_sweep_resumes_without_recomputing_finished_parts(cluster, tmp_path):
    out = tmp_path / "sweep"
    plan = sw.plan_sweep(MODELS[:2], PROMPTS, SEEDS, PROBE)
    parts = sw.run_parts(cluster, plan.unique(), out, progress=False)
    first = [next(parts).key for _ in range(3)]
    parts.close()  # interrupted: the remaining futures are cancelled
    before = log_events(out)
    finished_before = set(done_keys(before))
    assert set(first) <= finished_before
    ds = sw.sweep(MODELS[:2], PROMPTS, SEEDS, PROBE, out=out, scheduler=cluster.scheduler.address, progress=False)
    after = log_events(out)[len(before):]
    assert not finished_before & {e["key"] for e in after}, "a finished part was extracted again"
    assert sorted(done_keys(before) + done_keys(after)) == sorted(p.key for p in plan.parts)
    assert ds.sizes["checkpoint"] == 2 and (out / sw.MERGED_NAME).is_file()


def test_cli_sweep_reads_model_and_prompt_files_and_writes_dataset_and_report(cluster, tmp_path, capsys):
    (tmp_path / "models.txt").write_text("# checkpoints in order\ntiny-random\ntiny-trained  # after training\n")
    (tmp_path / "prompts.txt").write_text("a red square moving from left to right\n\na blue blob moving up\n")
    out = tmp_path / "sweep"
    argv = ["sweep", "--models-from", str(tmp_path / "models.txt"), "--prompts-from", str(tmp_path / "prompts.txt"),
            "--seeds", "0-1", "--out", str(out), "--scheduler", cluster.scheduler.address, "--sample-steps", "3",
            "--steps", "first,last", "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    ds = read_sweep(out / sw.MERGED_NAME)
    assert list(ds["checkpoint_source"].values) == ["tiny-random", "tiny-trained"]
    assert list(ds["prompt_text"].values) == PROMPTS and list(ds["seed"].values) == [0, 1]
    page = (out / "report.html").read_text()
    assert page.count('class="checkpoint"') == 2 and page.count('class="trend"') == 4
    assert main(argv) == 0, "a rerun with every part present"
    assert len(done_keys(log_events(out))) == 8, "the rerun extracted nothing"


def test_pytest_with_a_scheduler_gives_the_verdicts_of_a_local_run(cluster, tmp_path):
    root = Path(__file__).resolve().parents[1]
    runs = {}
    for name, extra in (("local", []), ("dask", ["--attn-scheduler", cluster.scheduler.address])):
        results = tmp_path / name
        subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "specs/tiny_default.yaml", "--no-attn-report",
             "--attn-cache", str(tmp_path / f"cache-{name}"), "--attn-results", str(results), *extra],
            cwd=root, check=True, capture_output=True,
        )
        checks = json.loads((results / "results.json").read_text())["checks"]
        runs[name] = {c["nodeid"]: (c["status"], c["observed"], c["message"]) for c in checks}
    assert runs["dask"] == runs["local"] and len(runs["local"]) > 40
    log = [json.loads(line) for line in (tmp_path / "cache-dask" / "extractions.log").read_text().splitlines()]
    worker_pids = set(cluster.run(os.getpid).values())
    specs = load_specs(root / "specs" / "tiny_default.yaml")  # one extraction per spec, none of them gpu-marked
    assert len(log) == len(specs) and {e["pid"] for e in log} <= worker_pids, "every extraction ran on the workers"


def test_local_gpu_workers_are_pinned_one_device_each_and_declare_a_gpu():
    specs = sw.local_worker_specs(2, gpus=4, threads=3)
    assert [s["env"]["CUDA_VISIBLE_DEVICES"] for s in specs.values()] == ["0", "1"]
    assert all(s["resources"] == {"GPU": 1} and s["nthreads"] == 1 for s in specs.values())
    with pytest.raises(HarnessError, match="more workers than the 1 GPU"):
        sw.local_worker_specs(2, gpus=1, threads=None)
    cpu = sw.local_worker_specs(2, gpus=0, threads=1)
    assert all(s["env"] == {"OMP_NUM_THREADS": "1"} and "resources" not in s for s in cpu.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_local_cluster_on_a_cuda_host_pins_each_worker_to_its_device():
    with sw.connect(f"local:{torch.cuda.device_count()}") as (client, resources):
        assert resources == {"GPU": 1}
        seen = client.run(lambda: (os.environ["CUDA_VISIBLE_DEVICES"], __import__("torch").cuda.device_count()))
        assert sorted(v[0] for v in seen.values()) == [str(i) for i in range(torch.cuda.device_count())]
        assert all(v[1] == 1 for v in seen.values())


def test_scheduler_and_resource_strings():
    assert sw.parse_scheduler("local:3") == ("local", 3)
    assert sw.parse_scheduler("tcp://10.0.0.5:8786") == ("address", "tcp://10.0.0.5:8786")
    assert sw.parse_resources("GPU=1, MEM=2") == {"GPU": 1.0, "MEM": 2.0}
    for bad in ("local:0", "local:x"):
        with pytest.raises(HarnessError, match="local:N"):
            sw.parse_scheduler(bad)
    with pytest.raises(HarnessError, match="NAME=AMOUNT"):
        sw.parse_resources("GPU")


def test_plan_keys_parts_by_fingerprint_probe_prompt_and_seed():
    plan = sw.plan_sweep(["tiny-random", "tiny-trained"], PROMPTS, SEEDS, PROBE)
    assert len({p.key for p in plan.parts}) == 8
    again = sw.plan_sweep(["tiny-trained"], PROMPTS[::-1], SEEDS, PROBE)
    by_cell = {(p.model, p.probe.prompt, p.probe.seed): p.key for p in plan.parts}
    assert all(by_cell[(p.model, p.probe.prompt, p.probe.seed)] == p.key for p in again.parts), "order does not matter"
    other = sw.plan_sweep(["tiny-random"], PROMPTS, SEEDS, PROBE.replace(sample_steps=4))
    assert not {p.key for p in other.parts} & set(by_cell.values()), "another probe is another part"
    with pytest.raises(HarnessError, match="twice"):
        sw.plan_sweep(["tiny-random", "tiny-random"], PROMPTS, SEEDS, PROBE)
    with pytest.raises(HarnessError, match="tiny-typo: not a model layout"):
        sw.plan_sweep(["tiny-typo"], PROMPTS, SEEDS, PROBE)


def test_training_step_from_the_name_or_the_checkpoint_dict(tmp_path):
    assert training_step_from_name("/runs/a/step_1200.pt") == 1200
    assert training_step_from_name("ckpt-3000.safetensors") == 3000
    assert training_step_from_name("model_000400.pt") == 400
    assert training_step_from_name("tiny-trained") is None
    path = tmp_path / "latest.pt"
    torch.save({"generator_ema": {"w": torch.zeros(1)}, "global_step": torch.tensor(5600)}, path)
    assert sw.training_step(str(path)) == 5600


def test_merge_puts_training_steps_on_the_checkpoint_dim_and_refuses_mismatched_parts(one_torch_thread):
    parts = {}
    for c, model in enumerate(("tiny-random", "tiny-trained")):
        ds = extract(model, PROBE, progress=False)
        ds.attrs["training_step"] = 100 * (c + 1)
        parts[(c, 0, 0)] = ds
    merged = merge_parts(parts, checkpoints=["step_100", "step_200"], prompts=[PROBE.prompt], seeds=[0])
    assert merged["training_step"].values.tolist() == [100.0, 200.0]
    assert merged["checkpoint_fingerprint"].dims == ("checkpoint",)
    assert merged["prompt_embedding_fingerprint"].dims == ("checkpoint",), "the two models embed the prompt differently"
    assert "seed" not in merged.attrs and "prompt" not in merged.attrs, "they are dims, not attrs"
    parts[(1, 0, 0)] = parts[(1, 0, 0)].sel(layer=[0, 1])
    with pytest.raises(HarnessError, match="has layer \\[0, 1\\], the first part \\[0, 1, 2, 3\\]"):
        merge_parts(parts, checkpoints=["a", "b"], prompts=[PROBE.prompt], seeds=[0])
    with pytest.raises(HarnessError, match="1 of 2 parts missing"):
        merge_parts({(0, 0, 0): parts[(0, 0, 0)]}, checkpoints=["a", "b"], prompts=[PROBE.prompt], seeds=[0])


def test_cli_sweep_bad_input_is_one_line(tmp_path, capsys):
    assert main(["sweep", "--models", "tiny-random", "--out", str(tmp_path), "--scheduler", "local:0"]) == 2
    assert "local:N" in capsys.readouterr().err
    assert main(["sweep", "--models-from", str(tmp_path / "none.txt"), "--out", str(tmp_path)]) == 2
    assert "cannot read the list file" in capsys.readouterr().err
