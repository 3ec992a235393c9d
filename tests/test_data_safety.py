"""Nothing is deleted or replaced that the harness did not create; interrupted and failed writes
leave nothing behind; a full disk is one line."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import xarray as xr

from attn_harness.core.atomic import STALE_AFTER_S, TEMP_SUFFIX, atomic_path, sweep_stale_temps, write_atomic
from attn_harness.core.errors import HarnessError
from attn_harness.core.probe import Probe
from attn_harness.sampling.cache import MARKER, CacheEntryWarning, ExtractionCache

REPO = Path(__file__).resolve().parents[1]


def dead_pid() -> int:
    """A pid that belonged to a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --------------------------------------------------------------------------- atomic writes


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "x.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temp:
            temp.write_text("half")
            raise RuntimeError("writer crashed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def test_temps_of_dead_writers_are_swept_and_live_or_foreign_files_are_kept(tmp_path):
    dead = tmp_path / f".x.nc.{dead_pid()}-{'a' * 32}{TEMP_SUFFIX}"
    alive = tmp_path / f".y.nc.{os.getpid()}-{'b' * 32}{TEMP_SUFFIX}"
    old = tmp_path / f".z.nc.{os.getpid()}-{'c' * 32}{TEMP_SUFFIX}"
    foreign = [tmp_path / ".x.nc.1234.tmp", tmp_path / "notes.attn-tmp", tmp_path / "x.nc"]
    for path in (dead, alive, old, *foreign):
        path.write_text("data")
    os.utime(old, (time.time() - STALE_AFTER_S - 60,) * 2)
    assert sorted(sweep_stale_temps(tmp_path)) == sorted([dead, old])
    assert alive.exists() and all(p.exists() for p in foreign)


def test_the_next_write_in_a_directory_sweeps_a_killed_writers_temp(tmp_path):
    """kill -9 during a write: the temp is gone after the next write there, and git ignores it meanwhile."""
    script = (
        "import sys, time; from attn_harness.core.atomic import atomic_path\n"
        "with atomic_path(sys.argv[1]) as temp:\n"
        "    temp.write_text('half'); print(temp.name, flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "b.nc")], stdout=subprocess.PIPE, text=True)
    name = proc.stdout.readline().strip()
    proc.kill()
    proc.wait()
    assert (tmp_path / name).exists()
    ignored = subprocess.run(["git", "check-ignore", "-q", f"baselines/demo/{name}"], cwd=REPO)
    assert ignored.returncode == 0, "the temp pattern is in .gitignore"
    write_atomic(tmp_path / "other.json", b"{}")
    assert not (tmp_path / name).exists() and not (tmp_path / "b.nc").exists()


def test_a_file_where_a_directory_is_expected_is_one_clear_error(tmp_path):
    (tmp_path / "blocker").write_text("mine")
    with pytest.raises(HarnessError, match="blocker is a file, not a directory"):
        write_atomic(tmp_path / "blocker" / "x.json", b"{}")
    (tmp_path / "dir").mkdir()
    with pytest.raises(HarnessError, match="it is a directory"):
        write_atomic(tmp_path / "dir", b"{}")
    assert (tmp_path / "blocker").read_text() == "mine"


@pytest.fixture
def full_disk(tmp_path):
    """A real 1 MiB tmpfs filled to the brim (needs root to mount; skipped otherwise)."""
    mount = tmp_path / "full"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        (mount / "filler").write_bytes(b"\0" * (1010 * 1024))  # leaves ~12 KiB: a file starts, and cannot finish
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_disk_full_during_extract_is_one_line_exit_2_and_no_file(full_disk):
    out = full_disk / "x.nc"
    done = subprocess.run(
        [sys.executable, "-m", "attn_harness", "extract", "--model", "tiny-random", "--sample-steps", "2",
         "--steps", "0,1", "--layers", "0-3", "--no-progress", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [
        f"attn-harness: error: cannot write {out}: the disk is full (no space left on the device); free space and rerun"
    ]
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]


# --------------------------------------------------------------------------- the extraction cache


def test_cache_clear_never_deletes_what_the_harness_did_not_write(tmp_path):
    checkout = tmp_path / "checkout"
    (checkout / ".git").mkdir(parents=True)
    (checkout / "README.md").write_text("precious")
    with pytest.raises(HarnessError, match="refusing to clear .*not an attn-harness cache"):
        ExtractionCache(checkout).clear()
    with pytest.raises(HarnessError, match="is not empty and is not an attn-harness cache"):
        ExtractionCache(checkout).prepare()
    assert (checkout / "README.md").read_text() == "precious" and (checkout / ".git").is_dir()


def test_cache_clear_removes_only_its_own_entries(tmp_path):
    cache = ExtractionCache(tmp_path / "cache")
    cache.prepare()
    own = [cache.path_for("a" * 64), Path(str(cache.path_for("a" * 64)) + ".lock"), cache.directory / "extractions.log"]
    planted = [cache.directory / "notes.txt", cache.directory / f"{'b' * 63}.nc", cache.directory / "sub"]
    for path in own + planted[:2]:
        path.write_text("x")
    planted[2].mkdir()
    removed = cache.clear()
    assert sorted(removed) == sorted(own)
    assert all(p.exists() for p in planted) and (cache.directory / MARKER).is_file()


def test_a_cache_directory_that_is_a_file_is_refused(tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("mine")
    with pytest.raises(HarnessError, match="is a file"):
        ExtractionCache(blocker).prepare()
    with pytest.raises(HarnessError, match="is a file"):
        ExtractionCache(blocker).clear()
    assert blocker.read_text() == "mine"


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory):
    cache = ExtractionCache(tmp_path_factory.mktemp("cache"))
    probe = Probe(sample_steps=1, capture_steps=(0,), layers=(0,))
    ds, path = cache.load_or_extract("tiny-random", probe)
    return cache, probe, ds, path


def test_a_corrupt_cache_entry_is_extracted_again_with_a_warning(warm_cache):
    cache, probe, ds, path = warm_cache
    path.write_bytes(b"\x89HDF garbage")
    with pytest.warns(CacheEntryWarning, match="cannot be read"):
        again, _ = cache.load_or_extract("tiny-random", probe)
    xr.testing.assert_allclose(again, ds, atol=1e-6, rtol=0)  # same probe, re-extracted (float32 noise at most)
    assert len(cache.extractions()) == 2


def test_a_valid_entry_of_another_key_is_not_trusted(warm_cache, tmp_path):
    cache, probe, ds, path = warm_cache
    other = ExtractionCache(tmp_path / "other")
    other_ds, other_path = other.load_or_extract("tiny-random", probe.replace(seed=1))
    path.write_bytes(other_path.read_bytes())  # a well-formed extraction, but of another probe
    with pytest.warns(CacheEntryWarning, match="holds data of another key"):
        again, _ = cache.load_or_extract("tiny-random", probe)
    assert int(again.attrs["seed"]) == 0 and int(other_ds.attrs["seed"]) == 1
    xr.testing.assert_allclose(again, ds, atol=1e-6, rtol=0)


def test_a_directory_holding_only_cache_files_of_a_concurrent_worker_is_not_foreign(tmp_path):
    """pytest -n 2: one worker may be mid-way through writing the marker when the other looks."""
    directory = tmp_path / "cache"
    directory.mkdir()
    (directory / f".{MARKER}.{os.getpid()}-{'d' * 32}{TEMP_SUFFIX}").write_text("half a marker")
    (directory / f"{'e' * 64}.nc.lock").write_text("")
    ExtractionCache(directory).prepare()
    assert (directory / MARKER).is_file()
