"""The two denoising loops a run can use, behind one interface: timesteps, then one step each.

* ``UniPCSampler``: Wan's own sampler, diffusers' flow-matching UniPC multistep scheduler with
  ``sample_steps`` steps and the probe's ``shift``.
* ``FewStepSampler``: the sampler of distilled autoregressive models (Self-Forcing, CausVid; see
  docs/autoregressive.md): at each listed timestep predict the clean latents
  x0 = x_t - sigma_t * v and, unless it is the last one, re-noise them to the next timestep
  with fresh seeded noise, x = (1 - sigma_next) * x0 + sigma_next * eps. sigma = t / 1000;
  with ``warp_timesteps`` the listed values are first mapped through the shift
  t -> 1000 * s(t / 1000), s(u) = shift * u / (1 + (shift - 1) * u), as Self-Forcing's
  ``warp_denoising_step`` does. The last step returns x0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from diffusers import UniPCMultistepScheduler

from attn_harness.core.probe import Probe

NUM_TRAIN_TIMESTEPS = 1000


class Sampler(Protocol):
    timesteps: torch.Tensor  # float32, one per step, on the run's device

    def step(self, index: int, velocity: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The latents after step ``index`` (``velocity`` predicted at ``timesteps[index]``)."""


def make_scheduler(probe: Probe) -> UniPCMultistepScheduler:
    return UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=probe.shift,
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
    )


class UniPCSampler:
    """Wan's flow-matching UniPC multistep sampler (stateful: one per denoised clip or block)."""

    def __init__(self, probe: Probe, device: torch.device) -> None:
        self.scheduler = make_scheduler(probe)
        self.scheduler.set_timesteps(probe.sample_steps, device=device)
        self.timesteps = self.scheduler.timesteps

    def step(self, index: int, velocity: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.scheduler.step(velocity.float(), self.timesteps[index], x, return_dict=False)[0]


def warp_timestep(t: float, shift: float) -> float:
    """1000 * s(t / 1000) with Wan's flow shift s(u) = shift * u / (1 + (shift - 1) * u)."""
    u = t / NUM_TRAIN_TIMESTEPS
    return NUM_TRAIN_TIMESTEPS * shift * u / (1 + (shift - 1) * u)


def few_step_timesteps(probe: Probe) -> list[float]:
    """The timesteps the few-step sampler runs at (warped by the probe's shift if asked)."""
    listed = [float(t) for t in probe.denoising_timesteps or ()]
    return [warp_timestep(t, probe.shift) for t in listed] if probe.warp_timesteps else listed


class FewStepSampler:
    """Predict x0, re-noise to the next timestep with noise from ``generators`` (one per row of the
    batch, so a batched population draws what each sample draws alone); x0 after the last."""

    def __init__(self, probe: Probe, device: torch.device, generators: Sequence[torch.Generator]) -> None:
        self.timesteps = torch.tensor(few_step_timesteps(probe), dtype=torch.float32, device=device)
        self.generators = list(generators)

    def sigma(self, index: int) -> float:
        return float(self.timesteps[index]) / NUM_TRAIN_TIMESTEPS

    def step(self, index: int, velocity: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x0 = x.float() - self.sigma(index) * velocity.float()
        if index + 1 == len(self.timesteps):
            return x0
        sigma_next = self.sigma(index + 1)
        if x0.shape[0] != len(self.generators):
            raise ValueError(f"{x0.shape[0]} rows to re-noise, {len(self.generators)} generators")
        row = (1, *x0.shape[1:])
        noise = torch.cat([torch.randn(row, generator=g, dtype=torch.float32) for g in self.generators]).to(x0.device)
        return (1 - sigma_next) * x0 + sigma_next * noise


def make_sampler(probe: Probe, device: torch.device, generator: torch.Generator | Sequence[torch.Generator]) -> Sampler:
    """The few-step sampler when the probe lists ``denoising_timesteps``, else UniPC; ``generator``: the
    run's, or one per sample of a batched population."""
    if probe.denoising_timesteps is not None:
        return FewStepSampler(probe, device, [generator] if isinstance(generator, torch.Generator) else generator)
    return UniPCSampler(probe, device)


def sampler_attrs(probe: Probe) -> dict:
    """What the dataset attrs record about the sampler."""
    if probe.denoising_timesteps is None:
        return {"scheduler": "UniPCMultistepScheduler(flow_prediction, use_flow_sigmas)", "sample_steps": probe.sample_steps}
    return {
        "scheduler": "few-step: x0 = x_t - sigma v, re-noise to the next timestep, sigma = t/1000",
        "sample_steps": len(probe.denoising_timesteps),
        "denoising_timesteps": [float(t) for t in probe.denoising_timesteps],
        "warp_timesteps": int(probe.warp_timesteps),
    }
