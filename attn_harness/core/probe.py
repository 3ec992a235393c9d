"""What to extract: the probe (sampling settings) and the capture selection, as plain data."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from attn_harness.core.errors import HarnessError
from attn_harness.core.fingerprint import seed_of_text
from attn_harness.core.frames import MASKS
from attn_harness.core.schema import METRICS, TEXT_METRIC

DTYPES = ("float32", "bfloat16", "float16")
METRIC_NAMES = (*METRICS, TEXT_METRIC)
BRANCHES = ("cond", "uncond")
MODES = ("teacher-forced", "rollout")


@dataclass(frozen=True)
class Probe:
    """Sampling run and capture selection for one extraction.

    ``None`` geometry means "the model's default" (the embedded models define theirs; real
    Wan models default to 81 frames at 480x832). ``capture_steps`` accepts ``first``, ``mid``,
    ``last`` and integers; ``layers`` is ``"all"`` or a tuple of block indices.
    ``prompt_embeds`` (a file) replaces the text encoder. ``mode`` ``teacher-forced`` denoises the
    whole clip in one pass per step (under ``mask``); ``rollout`` denoises it block by block with a
    KV cache of the earlier clean blocks (``attn_harness.sampling.rollout``) and needs ``mask:
    block-causal`` or ``sink-window`` (the cache keeps the first ``sink_frames`` frames and the last
    ``window_frames`` frames before the block). ``denoising_timesteps`` (e.g. ``(1000, 750, 500, 250)``)
    replaces the UniPC schedule with the few-step sampler of distilled models (predict x0, re-noise
    to the next timestep), warped by ``shift`` when ``warp_timesteps``. ``capture_timesteps``
    captures the steps nearest to those timestep values instead of ``capture_steps``. ``metrics``
    may add ``text_mass``, the cross-attention mass over text tokens.
    """

    prompt: str = "a red square moving from left to right"
    negative_prompt: str = ""
    seed: int = 0
    num_frames: int | None = None
    height: int | None = None
    width: int | None = None
    sample_steps: int = 10
    capture_steps: tuple[int | str, ...] = ("first", "mid", "last")
    layers: str | tuple[int, ...] = "all"
    metrics: tuple[str, ...] = ("logits", "mass")
    guidance: float = 5.0
    shift: float = 3.0
    mask: str = "bidirectional"
    block_size: int = 3
    dtype: str = "float32"
    device: str = "auto"
    branch: str = "cond"
    prompt_embeds: str | None = None
    mode: str = "teacher-forced"
    sink_frames: int = 0
    window_frames: int = 0
    denoising_timesteps: tuple[float, ...] | None = None
    warp_timesteps: bool = True
    capture_timesteps: tuple[float, ...] = ()
    prompts: tuple[str, ...] = ()
    seeds: tuple[int, ...] = ()
    sample_batch: int = 8

    @property
    def is_population(self) -> bool:
        """A probe over several prompts and/or seeds: its extraction has a ``sample`` dim."""
        return bool(self.prompts or self.seeds)

    def noise_seed(self, prompt: str, seed: int) -> int:
        """The seed of a sample's initial noise: ``seed`` itself for a single-sample probe; in a
        population, drawn from (seed, prompt), so that every sample has its own noise and the
        samples are independent draws (the same seed for two prompts would tie them together)."""
        if not self.is_population:
            return seed
        return seed_of_text(f"{seed}\0{prompt}") >> 1

    def samples(self) -> list[tuple[str, int]]:
        """(prompt, seed) of every sample: prompts x seeds, prompt-major; ``prompt``/``seed`` stand in for an empty list."""
        return [(prompt, seed) for prompt in (self.prompts or (self.prompt,)) for seed in (self.seeds or (self.seed,))]

    def __post_init__(self) -> None:
        for name, allowed in (("dtype", DTYPES), ("mask", MASKS), ("branch", BRANCHES), ("mode", MODES)):
            value = getattr(self, name)
            if value not in allowed:
                raise HarnessError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        bad_metrics = [m for m in self.metrics if m not in METRIC_NAMES]
        if bad_metrics or "logits" not in self.metrics:
            raise HarnessError(
                f"metrics must include 'logits' and may add {', '.join(repr(m) for m in METRIC_NAMES[1:])}; got {list(self.metrics)}"
            )
        if self.sample_steps < 1:
            raise HarnessError(f"sample_steps must be at least 1; got {self.sample_steps}")
        if self.block_size < 1:
            raise HarnessError(f"block_size must be at least 1; got {self.block_size}")
        if self.mode == "rollout" and self.mask == "bidirectional":
            raise HarnessError("mode 'rollout' attends to a KV cache of earlier blocks: set mask to block-causal or sink-window")
        if self.sink_frames < 0 or self.window_frames < 0:
            raise HarnessError(f"sink_frames and window_frames must be >= 0; got {self.sink_frames}, {self.window_frames}")
        if (self.sink_frames or self.window_frames) and self.mask != "sink-window":
            raise HarnessError(f"sink_frames/window_frames apply to mask sink-window only; got mask {self.mask!r}")
        if self.denoising_timesteps is not None:
            steps = list(self.denoising_timesteps)
            if not steps or any(not 0 < t <= 1000 for t in steps) or steps != sorted(set(steps), reverse=True):
                raise HarnessError(f"denoising_timesteps must be distinct values in (0, 1000], descending; got {steps}")
        if any(not 0 <= t <= 1000 for t in self.capture_timesteps):
            raise HarnessError(f"capture_timesteps must lie in [0, 1000]; got {list(self.capture_timesteps)}")
        if self.sample_batch < 1:
            raise HarnessError(f"sample_batch must be at least 1; got {self.sample_batch}")
        if len(set(self.samples())) != len(self.samples()):
            raise HarnessError("prompts and seeds must not repeat: each (prompt, seed) sample appears once")
        if self.is_population and (self.mode == "rollout" or self.prompt_embeds or self.denoising_timesteps):
            raise HarnessError(
                "prompts/seeds populations run teacher-forced with the UniPC sampler from prompt text "
                "(no rollout, denoising_timesteps or prompt_embeds)"
            )

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "Probe":
        return dataclasses.replace(self, **changes)
