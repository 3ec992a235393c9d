"""Attention over training: run one fixed probe every K steps of a training loop.

``AttentionMonitor`` is called from the user's loop with the model being trained and the
step. Every ``every`` steps it extracts the probe's statistics from the live model (in eval
mode and without gradients, then restores the mode), appends them to a NetCDF training
history (``attn_harness.core.history``) and, given a TensorBoard ``SummaryWriter``, logs each
head's sink score and diagonal mass as scalars and the head grid of one layer as a figure.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import xarray as xr

from attn_harness.core import metrics
from attn_harness.core.history import append_checkpoint
from attn_harness.core.probe import Probe
from attn_harness.model.models import Geometry, LoadedModel, state_fingerprint
from attn_harness.model.prompts import MissingPromptEncoder
from attn_harness.sampling.extract import extract


class AttentionMonitor:
    """Append the probe's attention statistics to ``history`` every ``every`` training steps.

    ``encode_prompt`` maps the probe's prompt to ``[1, tokens, text_dim]`` embeddings (or give
    the probe ``prompt_embeds``); ``geometry`` gives the probe's defaults for frames and size.
    """

    def __init__(
        self,
        history: str | os.PathLike,
        probe: Probe,
        *,
        every: int,
        geometry: Geometry,
        encode_prompt: Callable[[str], torch.Tensor] | None = None,
        model_id: str = "training run",
        writer: Any | None = None,
        figure_layer: int | None = None,
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be at least 1; got {every}")
        self.history = Path(history)
        self.probe = probe
        self.every = every
        self.geometry = geometry
        self.encode_prompt = encode_prompt or MissingPromptEncoder("AttentionMonitor")
        self.model_id = model_id
        self.writer = writer
        self.figure_layer = figure_layer

    def __call__(self, model: torch.nn.Module, step: int) -> xr.Dataset | None:
        """At every ``every``-th step: extract, append, log; return the extraction (else None)."""
        if step % self.every:
            return None
        was_training = model.training
        model.eval()
        try:
            loaded = LoadedModel(
                transformer=model,
                model_id=self.model_id,
                checkpoint_path=f"{self.model_id} at train step {step}",
                fingerprint=state_fingerprint(model),
                geometry=self.geometry,
                encode_prompt=self.encode_prompt,
                prompt_encoder=getattr(self.encode_prompt, "description", "user encoder"),
                layout="in memory",
                architecture="the model being trained",
            )
            ds = extract(loaded, self.probe, progress=False)
        finally:
            model.train(was_training)
        append_checkpoint(self.history, ds, train_step=step)
        if self.writer is not None:
            self._log(ds, step)
        return ds

    def _log(self, ds: xr.Dataset, step: int) -> None:
        logits = ds["logits"].isel(step=-1)
        sink = metrics.head_stats(logits, metrics.default_query_frames(ds))["sink"]
        for layer in sink["layer"].values:
            for head in sink["head"].values:
                self.writer.add_scalar(f"attention/layer{int(layer)}/head{int(head)}/sink",
                                       float(sink.sel(layer=layer, head=head)), step)
        if "mass" in ds:
            diag = metrics.diagonal_mean(ds["mass"].isel(step=-1), keep=("layer", "head"))
            for layer in diag["layer"].values:
                for head in diag["head"].values:
                    self.writer.add_scalar(
                        f"attention/layer{int(layer)}/head{int(head)}/diagonal_mass",
                        float(diag.sel(layer=layer, head=head)), step
                    )
        if self.figure_layer is not None:
            from attn_harness.report.figures import head_grid

            figure = head_grid(logits.sel(layer=self.figure_layer), title=f"layer {self.figure_layer} at train step {step}")
            self.writer.add_figure(f"attention/layer{self.figure_layer}/heads", figure, step)
