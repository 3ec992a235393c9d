"""``attn-harness drift``: the largest abs/rel difference per variable and where, between two
extractions or one spec run in two environments (fresh processes with environment overrides)."""

from __future__ import annotations

import json
import textwrap

import pytest

from attn_harness.cli import main
from attn_harness.core import store
from attn_harness.core.drift import drift
from attn_harness.core.probe import Probe
from attn_harness.sampling.extract import extract

QUICK = Probe(sample_steps=2, capture_steps=("first",), layers=(0, 1), device="cpu")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("drift")
    ds = extract("tiny-random", QUICK, progress=False)
    changed = ds.copy(deep=True)
    changed["logits"][dict(step=0, layer=1, head=2, query_frame=3, key_frame=5)] += 0.125
    row = dict(step=0, layer=0, head=1, query_frame=4)
    shift = 0.25 * float(ds["mass"].sel(**row, key_frame=[4, 5]).min())  # moved within the row: it still sums to 1
    changed["mass"][dict(**row, key_frame=4)] += shift
    changed["mass"][dict(**row, key_frame=5)] -= shift
    return store.write_dataset(ds, folder / "a.nc"), store.write_dataset(changed, folder / "b.nc")


def test_identical_extractions_have_zero_drift(pair):
    a = store.read_dataset(pair[0])
    assert all(item.max_abs.value == 0.0 and item.max_rel.value == 0.0 for item in drift(a, a))


def test_drift_names_the_largest_differences_and_their_cells(pair, capsys):
    assert main(["drift", str(pair[0]), str(pair[1])]) == 0
    out = capsys.readouterr().out
    assert "logits: 648 cells, 0 NaN mismatches" in out
    assert "max abs diff 0.125 at step=0 layer=1 head=2 query_frame=3 key_frame=5" in out
    a = store.read_dataset(pair[0])["mass"].sel(step=0, layer=0, head=1, query_frame=4)
    smaller = 4 if float(a.sel(key_frame=4)) < float(a.sel(key_frame=5)) else 5
    assert f"max rel diff 0.25 at step=0 layer=0 head=1 query_frame=4 key_frame={smaller}" in out


def test_drift_json(pair, capsys):
    assert main(["drift", str(pair[0]), str(pair[1]), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["variables"]["logits"]["max_abs"] == {
        "value": pytest.approx(0.125, abs=1e-6), "where": {"step": 0, "layer": 1, "head": 2, "query_frame": 3, "key_frame": 5}
    }


def test_extractions_of_different_structure_are_refused_in_one_line(pair, tmp_path, capsys):
    other = store.write_dataset(store.read_dataset(pair[0]).sel(layer=[0]), tmp_path / "one_layer.nc")
    assert main(["drift", str(pair[0]), str(other)]) == 2
    assert "coordinate layer: a [0, 1] vs b [0]" in capsys.readouterr().err


def test_one_spec_in_two_environments(tmp_path, capsys):
    spec = tmp_path / "specs" / "s.yaml"
    spec.parent.mkdir()
    spec.write_text(textwrap.dedent("""\
        specs:
          - name: s
            model: tiny-random
            probe: {sample_steps: 1, capture_steps: [first], device: cpu}
            layers:
              0: [row_stochastic]
    """))
    argv = ["drift", "--spec", str(spec), "--name", "s", "--base-env", "OMP_NUM_THREADS=2",
            "--env", "OMP_NUM_THREADS=1", "--keep", str(tmp_path / "runs")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "drift of OMP_NUM_THREADS=1 against OMP_NUM_THREADS=2" in out
    assert "numerics_env: OMP_NUM_THREADS=2 vs OMP_NUM_THREADS=1" in out
    runs = {p.name: store.read_dataset(p) for p in (tmp_path / "runs").iterdir()}
    assert "OMP_NUM_THREADS=1" in runs["env.nc"].attrs["numerics_env"].split()
    assert "OMP_NUM_THREADS=2" in runs["base.nc"].attrs["numerics_env"].split()


def test_a_spec_name_that_is_not_there_fails_in_one_line(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text("specs:\n  - name: s\n    model: tiny-random\n    layers:\n      0: [row_stochastic]\n")
    assert main(["drift", "--spec", str(spec), "--name", "nope", "--env", "OMP_NUM_THREADS=1"]) == 2
    assert "no spec named 'nope'; specs are s" in capsys.readouterr().err
