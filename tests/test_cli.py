"""The attn-harness command line: the documented commands work, bad input is one clear line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import xarray as xr

from attn_harness.cli import build_parser, main, parse_int_list, probe_from_args
from attn_harness.core.errors import HarnessError
from attn_harness.core.store import read_dataset
from attn_harness.core.vocabulary import DEFAULT_STEP


@pytest.fixture(scope="module")
def extraction(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "x.nc"
    assert main(["extract", "--model", "tiny-random", "--out", str(out), "--sample-steps", "4", "--no-progress"]) == 0
    return out


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("attn-harness: error: ")
    return err[0]


def test_console_script_extracts_and_prints_stats(tmp_path):
    exe = Path(sys.executable).with_name("attn-harness")
    assert exe.exists(), "the attn-harness console script is installed beside the interpreter"
    out = tmp_path / "x.nc"
    subprocess.run([exe, "extract", "--model", "tiny-random", "--out", str(out), "--sample-steps", "2", "--layers", "3"],
                   check=True, capture_output=True)
    stats = subprocess.run([exe, "stats", str(out), "--layer", "3"], check=True, capture_output=True, text=True).stdout
    assert "Diagonal mean (self-attention):" in stats and "H 3: first=" in stats


def test_extract_writes_a_valid_file_with_the_chosen_selection(tmp_path):
    out = tmp_path / "sel.nc"
    argv = ["extract", "--model", "tiny-random", "--out", str(out), "--layers", "0-1,3", "--steps", "0,2", "--sample-steps", "3",
            "--metrics", "logits", "--mask", "block-causal", "--no-progress"]
    assert main(argv) == 0
    ds = read_dataset(out)
    assert list(ds["layer"].values) == [0, 1, 3] and list(ds["step"].values) == [0, 2]
    assert "mass" not in ds and ds.attrs["mask"] == "block-causal"


def test_stats_json_has_the_documented_keys(extraction, capsys):
    assert main(["stats", str(extraction), "--layer", "2", "--step", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"diagonal_mean", "first_frame_mean", "heads"} <= set(report)
    assert [h["head"] for h in report["heads"]] == [0, 1, 2, 3]
    assert set(report["heads"][0]) == {"head", "first", "mid", "last", "sink"}
    assert report["heads"][1]["sink"] == pytest.approx(report["heads"][1]["first"] - report["heads"][1]["mid"])
    ds = read_dataset(extraction)
    diag = ds["logits"].sel(step=2, layer=2).values.diagonal(axis1=1, axis2=2).mean()
    assert report["diagonal_mean"] == pytest.approx(float(diag), abs=1e-6)


def test_stats_query_frames_select_the_profile(extraction, capsys):
    main(["stats", str(extraction), "--layer", "0", "--query-frames", "4,5", "--json"])
    report = json.loads(capsys.readouterr().out)
    ds = read_dataset(extraction)
    first = ds["logits"].sel(step=3, layer=0, head=0, query_frame=[4, 5], key_frame=0).mean()  # default: last step
    assert report["query_frames"] == [4, 5]
    assert report["heads"][0]["first"] == pytest.approx(float(first), abs=1e-6)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["stats", "{nc}", "--layer", "9"], "layer 9 is not in this extraction; it has layers [0, 1, 2, 3]"),
        (["stats", "{nc}", "--layer", "0", "--step", "1"], "step 1 is not in this extraction; it has steps [0, 2, 3]"),
        (["stats", "{nc}", "--layer", "0", "--query-frames", "8,9"], "query frames [9] are not in this data"),
        (["stats", "{missing}", "--layer", "0"], "does not exist"),
        (["extract", "--model", "tiny-random", "--out", "{out}", "--layers", "5"], "out of range: this model has 4 layers"),
        (["extract", "--model", "tiny-random", "--out", "{out}", "--steps", "last,12"], "--steps: step 12 is out of range"),
        (["extract", "--model", "tiny-random", "--out", "{out}", "--frames", "30"], "must be 1 + k*4"),
        (["extract", "--model", "tiny-random", "--out", "{out}", "--layers", "a-b"], "is not a list of integers"),
        (["extract", "--out", "{out}", "--model", "{missing}"], "no such embedded model"),
        (["extract", "--model", "tiny-random", "--out", "{out}", "--layers", "3-1,0"], "'3-1' runs backwards"),
        (["extract", "--model", "tiny-random", "--out", "{out}", "--layers", "0-99999999"], "beyond the largest"),
        (["extract", "--model", "tiny-random", "--out", "{out}", "--guidance", "nan"], "--guidance 'nan': must be a finite"),
        (["extract", "--model", "tiny-random", "--out", "{out}", "--shift", "inf"], "--shift 'inf': must be a finite"),
        (["extract", "--model", "tiny-random", "--out", "{out}", "--frames", "0"], "--frames '0': must be >= 1"),
        (["extract", "--model", "tiny-random", "--out", "{out}", "--height", "0"], "--height '0': must be >= 16"),
        (["extract", "--model", "tiny-random", "--out", "{out}", "--seed", str(2**64)], "--seed"),
        (["extract", "--model", "tiny-random", "--out", "{out}", "--sample-steps", "10000000"], "must be <= 1000"),
        (["extract", "--model", "tiny-random", "--out", "{out}", "--mode", "rollout", "--mask", "bidirectional"],
         "--mask: mode 'rollout' attends to a KV cache"),
        (["stats", "{nc}", "--layer", "0", "--step", "middle"], "--step: a step is first, mid, last or an index"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(argv, needle, extraction, tmp_path, capsys):
    out = tmp_path / "never.nc"
    fill = {"nc": str(extraction), "missing": str(tmp_path / "absent.nc"), "out": str(out)}
    assert main([part.format(**fill) for part in argv]) == 2
    assert needle in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_a_pt_without_the_seed_keys_is_refused(tmp_path, capsys):
    bad = tmp_path / "layer20.pt"
    torch.save({"attention": torch.zeros(2, 3, 3)}, bad)
    assert main(["import-legacy", str(bad), "--out", str(tmp_path / "x.nc")]) == 2
    line = one_error_line(capsys)
    assert "layer20.pt" in line and "full_frame_attention" in line
    assert not (tmp_path / "x.nc").exists()


def test_a_netcdf_that_is_not_ours_is_refused(tmp_path, capsys):
    foreign = tmp_path / "foreign.nc"
    xr.Dataset({"temperature": ("time", [1.0, 2.0])}).to_netcdf(foreign, engine="h5netcdf")
    assert main(["stats", str(foreign), "--layer", "0"]) == 2
    assert "foreign.nc" in one_error_line(capsys)


def test_legacy_import_then_stats(tmp_path, capsys):
    gen = torch.Generator().manual_seed(0)
    legacy = {
        "full_frame_attention": torch.randn(12, 21, 21, generator=gen).half(),
        "layer_index": 20, "num_frames": 21, "num_heads": 12, "block_sizes": [3] * 7,
        "last_block_query_frames": [18, 19, 20], "tokens_per_frame": 1560, "prompt": "a cat", "is_logits": True,
    }
    torch.save(legacy, tmp_path / "layer20.pt")
    assert main(["import-legacy", str(tmp_path / "layer20.pt"), "--out", str(tmp_path / "l.nc")]) == 0
    assert main(["stats", str(tmp_path / "l.nc"), "--layer", "20", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    attn = legacy["full_frame_attention"].float()
    profile = attn[:, 18:21].mean(1)
    assert report["query_frames"] == [18, 19, 20]
    assert report["heads"][7]["sink"] == pytest.approx(float(profile[7, 0] - profile[7, 1:20].mean()), abs=1e-5)


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for command in ("extract", "import-legacy", "stats"):
        assert command in help_text


def test_int_lists_and_ranges():
    assert parse_int_list("0-3,5") == [0, 1, 2, 3, 5]
    assert parse_int_list("7") == [7]
    assert parse_int_list("3,1-2,3") == [1, 2, 3]  # duplicates dropped
    for bad in (",", "3-1", "all"):
        with pytest.raises(HarnessError):
            parse_int_list(bad)


def test_extract_needs_a_model(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["extract", "--out", str(tmp_path / "x.nc")])
    assert exit_info.value.code == 2
    assert "--model" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_rollout_mode_implies_block_causal_and_layer_lists_drop_duplicates():
    args = build_parser().parse_args(["extract", "--model", "tiny-random", "--out", "x.nc", "--mode", "rollout",
                                      "--layers", "2,0-1,1"])
    probe = probe_from_args(args)
    assert probe.mode == "rollout" and probe.mask == "block-causal"
    assert probe.layers == (0, 1, 2)


@pytest.mark.parametrize("command", ["stats", "plot", "compare"])
def test_one_default_step_and_one_meaning_of_mid(command, capsys):
    """stats, plot and compare show the last step by default; mid is sample_steps // 2 everywhere."""
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "mid (sample_steps // 2)" in " ".join(capsys.readouterr().out.split())
    assert DEFAULT_STEP == "last"


def test_stats_defaults_to_the_last_step_and_mid_is_half_the_sample_steps(extraction, capsys):
    assert main(["stats", str(extraction), "--layer", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 3  # 4 sample steps: captured 0, 2, 3
    assert main(["stats", str(extraction), "--layer", "0", "--step", "mid", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 4 // 2


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["extract", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--sample-steps SAMPLE_STEPS denoising steps of the run (default: 10)" in text
    assert "(default: first,mid,last)" in text and "(default: all)" in text


def test_python_dash_m_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "attn_harness", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("attn-harness ")


def test_a_closed_pipe_is_not_an_error(extraction):
    """`attn-harness stats ... | head`: the reader leaves early; no traceback, exit 0."""
    proc = subprocess.Popen([sys.executable, "-m", "attn_harness", "stats", str(extraction), "--layer", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # closed before the command writes (it imports first)
    assert proc.wait(timeout=120) == 0
    assert proc.stderr.read() == b""


def test_outputs_never_overwrite_inputs(extraction, tmp_path, capsys):
    before = extraction.read_bytes()
    assert main(["compare", str(extraction), str(extraction), "--out", str(extraction)]) == 2
    assert "is an input of this command" in one_error_line(capsys)
    legacy = tmp_path / "layer.pt"
    legacy.write_bytes(b"not really a pickle")
    assert main(["import-legacy", str(legacy), "--out", str(legacy)]) == 2
    assert "is an input of this command" in one_error_line(capsys)
    assert legacy.read_bytes() == b"not really a pickle" and extraction.read_bytes() == before


def test_a_file_where_a_directory_is_expected_is_one_line(extraction, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    assert main(["plot", str(extraction), "--layer", "0", "--out", str(blocker)]) == 2
    assert "is a file; give a directory" in one_error_line(capsys)
    assert main(["extract", "--model", "tiny-random", "--sample-steps", "1", "--layers", "0", "--no-progress",
                 "--out", str(blocker / "x.nc")]) == 2
    assert "is a file, not a directory" in one_error_line(capsys)
    assert blocker.read_text() == "mine"
