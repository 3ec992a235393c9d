"""Attention over training: the monitor, the NetCDF history and the trend property and figure."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attn_harness.core.checks import run_check
from attn_harness.core.errors import HarnessError
from attn_harness.core.history import append_checkpoint, read_history
from attn_harness.core.schema import REQUIRED_ATTRS, build_dataset
from attn_harness.fixtures import train_tiny
from attn_harness.report import figures


def _extraction(sink_of_head0: float, fingerprint: str = "abc") -> "xr.Dataset":  # noqa: F821
    """6 frames, 2 heads; head 0's logits put ``sink_of_head0`` extra on key frame 0."""
    logits = np.zeros((1, 1, 2, 6, 6), dtype=np.float32)
    logits[:, :, 0, :, 0] = sink_of_head0
    return build_dataset({"logits": logits}, steps=[0], timesteps=[999.0], layers=[3],
                         attrs={**{key: "unknown" for key in REQUIRED_ATTRS}, "mask": "bidirectional", "block_size": 3,
                                "checkpoint_fingerprint": fingerprint})


def _history(tmp_path, sinks):
    path = tmp_path / "history.nc"
    for step, sink in enumerate(sinks):
        append_checkpoint(path, _extraction(sink, f"fp{step}"), train_step=100 * step)
    return read_history(path)


def test_history_stacks_checkpoints_with_their_train_step_and_fingerprint(tmp_path):
    history = _history(tmp_path, [1.0, 1.2, 1.5])
    assert history.sizes["checkpoint"] == 3
    assert history["train_step"].values.tolist() == [0, 100, 200]
    assert history["fingerprint"].values.tolist() == ["fp0", "fp1", "fp2"]
    assert float(history["logits"].sel(head=0, query_frame=5, key_frame=0).isel(checkpoint=2).squeeze()) == 1.5


def test_history_refuses_other_files_other_probes_and_repeated_steps(tmp_path):
    notes = tmp_path / "notes.nc"
    notes.write_text("my notes")
    with pytest.raises(HarnessError, match="not a NetCDF4/HDF5 file"):
        append_checkpoint(notes, _extraction(1.0), train_step=0)
    assert notes.read_text() == "my notes"
    path = tmp_path / "h.nc"
    append_checkpoint(path, _extraction(1.0), train_step=0)
    with pytest.raises(HarnessError, match="already in the history"):
        append_checkpoint(path, _extraction(1.0), train_step=0)
    other = _extraction(1.0).isel(query_frame=slice(0, 5), key_frame=slice(0, 5))
    with pytest.raises(HarnessError, match="query_frame values .* differ"):
        append_checkpoint(path, other, train_step=1)
    assert read_history(path).sizes["checkpoint"] == 1


def test_trend_passes_while_the_sink_holds_and_fails_when_it_falls(tmp_path):
    rising = _history(tmp_path / "a", [1.0, 1.2, 1.5])
    assert run_check(rising, "trend", {"max_drop": 0.1, "last": 3}).status == "pass"
    falling = _history(tmp_path / "b", [1.5, 1.4, 0.6])
    result = run_check(falling, "trend", {"max_drop": 0.1, "last": 3})
    assert result.status == "fail"
    assert [v.location["head"] for v in result.violations] == [0]
    assert "peak 1.5, now 0.6" in result.message
    # only the last N checkpoints count: an old fall is forgiven
    recovered = _history(tmp_path / "c", [1.5, 0.2, 0.3, 0.35])
    assert run_check(recovered, "trend", {"max_drop": 0.1, "last": 3}).status == "pass"


def test_trend_needs_a_history():
    with pytest.raises(HarnessError, match="checkpoint"):
        run_check(_extraction(1.0), "trend", {"max_drop": 0.1})


def test_a_nan_max_drop_is_an_error_not_a_pass(tmp_path):
    falling = _history(tmp_path, [1.5, 1.4, 0.6])
    with pytest.raises(HarnessError, match="trend: max_drop: must be a finite number; got nan"):
        run_check(falling, "trend", {"max_drop": float("nan")})


class Scalars:
    """Collects what the monitor logs, in TensorBoard's ``SummaryWriter`` interface."""

    def __init__(self):
        self.scalars, self.figures = [], []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def add_figure(self, tag, figure, step):
        self.figures.append((tag, step))


def test_monitor_records_a_short_training_run_without_changing_it(tmp_path):
    settings = train_tiny.TrainSettings(steps=4, batch_size=2)
    monitor = train_tiny.attention_monitor(tmp_path / "attention.nc", every=2, mask="bidirectional")
    monitor.writer, monitor.figure_layer = Scalars(), 0
    monitored = train_tiny.train(settings, tmp_path / "monitored", progress=False, callback=monitor)
    plain = train_tiny.train(settings, tmp_path / "plain", progress=False)
    assert monitored["final_loss"] == plain["final_loss"]  # the probe leaves training untouched

    history = read_history(tmp_path / "attention.nc")
    assert history["train_step"].values.tolist() == [2, 4]
    assert len(set(history["fingerprint"].values.tolist())) == 2
    assert set(history.data_vars) == {"logits", "mass", "aligned_mass"}
    assert history.attrs["model_id"] == "train_tiny"
    tags = {tag for tag, _, _ in monitor.writer.scalars}
    assert "attention/layer3/head0/sink" in tags and "attention/layer0/head2/diagonal_mass" in tags
    assert monitor.writer.figures == [("attention/layer0/heads", 2), ("attention/layer0/heads", 4)]
    png = figures.render(figures.trend(history, layer=2), "png")
    assert png[:4] == b"\x89PNG"


def test_monitor_logs_to_a_real_tensorboard_event_file(tmp_path):
    tensorboard = pytest.importorskip("torch.utils.tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = tensorboard.SummaryWriter(log_dir=str(tmp_path / "tb"))
    monitor = train_tiny.attention_monitor(tmp_path / "attention.nc", every=1, mask="block-causal")
    monitor.writer = writer
    model = train_tiny.build_model(0)
    monitor(model, 1)
    writer.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    sink = events.Scalars("attention/layer1/head2/sink")
    assert [e.step for e in sink] == [1] and np.isfinite(sink[0].value)
    assert model.training  # the monitor puts the model back in the mode it found it in


def test_monitor_runs_only_every_k_steps(tmp_path):
    monitor = train_tiny.attention_monitor(tmp_path / "a.nc", every=3, mask="bidirectional")
    model = train_tiny.build_model(0)
    assert monitor(model, 1) is None and monitor(model, 2) is None
    assert monitor(model, 3) is not None
    assert read_history(tmp_path / "a.nc")["train_step"].values.tolist() == [3]
    with torch.no_grad():
        next(model.parameters()).add_(0.1)
    monitor(model, 6)
    assert read_history(tmp_path / "a.nc").sizes["checkpoint"] == 2
