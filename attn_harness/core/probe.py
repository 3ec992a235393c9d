"""What to extract: the probe (sampling settings) and the capture selection, as plain data."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from attn_harness.core.errors import HarnessError

DTYPES = ("float32", "bfloat16", "float16")
MASKS = ("bidirectional", "block-causal")
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
    KV cache of the earlier clean blocks (``attn_harness.sampling.rollout``) and needs ``mask: block-causal``.
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

    def __post_init__(self) -> None:
        for name, allowed in (("dtype", DTYPES), ("mask", MASKS), ("branch", BRANCHES), ("mode", MODES)):
            value = getattr(self, name)
            if value not in allowed:
                raise HarnessError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        bad_metrics = [m for m in self.metrics if m not in ("logits", "mass")]
        if bad_metrics or "logits" not in self.metrics:
            raise HarnessError(f"metrics must include 'logits' and may add 'mass'; got {list(self.metrics)}")
        if self.sample_steps < 1:
            raise HarnessError(f"sample_steps must be at least 1; got {self.sample_steps}")
        if self.block_size < 1:
            raise HarnessError(f"block_size must be at least 1; got {self.block_size}")
        if self.mode == "rollout" and self.mask != "block-causal":
            raise HarnessError(
                "mode 'rollout' attends block-causally (each block sees the cached earlier blocks): set mask to block-causal"
            )

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "Probe":
        return dataclasses.replace(self, **changes)
