"""What to extract: the probe (sampling settings) and the capture selection, as plain data.

Every probe parameter is one entry of ``PROBE_FIELDS`` (the YAML key, its Python attribute,
kind, default, bounds and meaning); the spec loader, the ``extract`` CLI flags, the JSON
Schema and the docs table are derived from it, and ``Probe`` validates itself against it, so
a probe built from YAML, flags or Python is checked the same way.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attn_harness.core.errors import HarnessError
from attn_harness.core.fingerprint import seed_of_text
from attn_harness.core.frames import MASKS
from attn_harness.core.schema import METRICS, TEXT_METRIC
from attn_harness.core.vocabulary import Field, FieldError, resolve_step

DTYPES = ("float32", "bfloat16", "float16")
METRIC_NAMES = (*METRICS, TEXT_METRIC)
BRANCHES = ("cond", "uncond")
MODES = ("teacher-forced", "rollout")

# YAML key -> field. ``attr`` is the Probe attribute where it differs; ``flag`` the CLI flag.
PROBE_FIELDS: dict[str, Field] = {
    "prompt": Field("str", "a red square moving from left to right", "text prompt"),
    "negative_prompt": Field("str", "", "negative prompt for classifier-free guidance"),
    "seed": Field("int", 0, "noise seed", low=0, high=2**63 - 1),
    "frames": Field("int", None, "pixel frames, 1 + 4k (default: the model's)", low=1, high=1001, attr="num_frames"),
    "height": Field("int", None, "pixel height, a multiple of 16 (default: the model's)", low=16, high=4096),
    "width": Field("int", None, "pixel width, a multiple of 16 (default: the model's)", low=16, high=4096),
    "sample_steps": Field("int", 10, "denoising steps of the run", low=1, high=1000),
    "capture_steps": Field("capture_steps", ("first", "mid", "last"),
                           "steps to capture: indices, or first (0), mid (sample_steps // 2), last",
                           high=999, flag="--steps"),
    "guidance": Field("number", 5.0, "classifier-free guidance scale (<= 1 runs the conditional pass only)",
                      low=0, high=100),
    "shift": Field("number", 3.0, "flow shift of the scheduler", above=0, high=100),
    "mask": Field("choice", None, "self-attention mask (default: block-causal for mode rollout, else bidirectional)",
                  MASKS),
    "block_size": Field("int", 3, "latent frames per block (block-causal)", low=1, high=64),
    "dtype": Field("choice", "float32", "model dtype (statistics are always float32)", DTYPES),
    "device": Field("device", "auto", "auto picks CUDA when present"),
    "branch": Field("choice", "cond", "CFG branch to capture", BRANCHES),
    "metrics": Field("choices", ("logits", "mass"), "variables to store: logits, optionally mass, text_mass",
                     METRIC_NAMES),
    "mode": Field("choice", "teacher-forced",
                  "teacher-forced: whole clip per step; rollout: block by block with a KV cache", MODES),
    "prompt_embeds": Field("str", None, "text embeddings file replacing the text encoder"),
    "sink_frames": Field("int", 0, "mask sink-window: latent frames at the start every block keeps", low=0, high=1000),
    "window_frames": Field("int", 0, "mask sink-window: latest latent frames before the block it keeps",
                           low=0, high=1000),
    "denoising_timesteps": Field("numbers", None, "few-step sampler timesteps, descending (replaces UniPC)",
                                 low=0, high=1000),
    "warp_timesteps": Field("bool", True, "warp denoising_timesteps by shift"),
    "capture_timesteps": Field("numbers", (), "capture the steps nearest these timesteps instead of capture_steps",
                               low=0, high=1000),
    "prompts": Field("strings", (), "population: the prompts (in a spec also a text file, one prompt a line; "
                     "on the CLI --prompts FILE)"),
    "seeds": Field("int_list", (), "population: the noise seeds (CLI: 0,1,2 or a range 0-3)", high=2**63 - 1),
    "sample_batch": Field("int", 8, "population: samples run through the model at once", low=1, high=1024),
}
PROBE_ATTRS: dict[str, str] = {key: f.attr or key for key, f in PROBE_FIELDS.items()}


def read_prompts(path: str | os.PathLike) -> list[str]:
    """A population's prompts from a text file: its non-empty lines, stripped. ``ValueError`` says what is wrong
    with the file, quoted, so a name with a newline stays one line."""
    try:
        prompts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(path)!r}: cannot read it ({err})") from None
    if not prompts:
        raise ValueError(f"{str(path)!r}: holds no prompt (one prompt a line)")
    return prompts


class ProbeError(HarnessError):
    """A bad probe value; ``key`` is the YAML key at fault (for the spec's line)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


@dataclass(frozen=True)
class Probe:
    """Sampling run and capture selection for one extraction.

    ``None`` geometry means "the model's default" (the embedded models define theirs; real
    Wan models default to 81 frames at 480x832). ``capture_steps`` accepts ``first``, ``mid``
    (``sample_steps // 2``), ``last`` and integers; ``layers`` is ``"all"`` or a tuple of block
    indices. ``prompt_embeds`` (a file) replaces the text encoder. ``mode`` ``teacher-forced``
    denoises the whole clip in one pass per step (under ``mask``); ``rollout`` denoises it block
    by block with a KV cache of the earlier clean blocks (``attn_harness.sampling.rollout``) and
    attends block-causally (``mask`` defaults to block-causal; ``sink-window`` keeps the first
    ``sink_frames`` frames and the last ``window_frames`` frames before the block; bidirectional
    is refused). ``denoising_timesteps`` (e.g. ``(1000, 750, 500, 250)``) replaces the UniPC
    schedule with the few-step sampler of distilled models (predict x0, re-noise to the next
    timestep), warped by ``shift`` when ``warp_timesteps``. ``capture_timesteps`` captures the
    steps nearest to those timestep values instead of ``capture_steps``. ``metrics`` may add
    ``text_mass``, the cross-attention mass over text tokens.
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
    mask: str | None = None
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
        for key, field_ in PROBE_FIELDS.items():
            attr = PROBE_ATTRS[key]
            try:
                object.__setattr__(self, attr, field_.coerce(getattr(self, attr)))
            except FieldError as err:
                raise ProbeError(key, err.message) from None
        try:
            object.__setattr__(self, "layers", Field("layers").coerce(self.layers))
        except FieldError as err:
            raise ProbeError("layers", err.message) from None
        if "logits" not in self.metrics:
            raise ProbeError("metrics", f"must include 'logits' and may add 'mass', 'text_mass'; got {list(self.metrics)}")
        if self.mask is None:
            object.__setattr__(self, "mask", "block-causal" if self.mode == "rollout" else "bidirectional")
        if self.mode == "rollout" and self.mask == "bidirectional":
            raise ProbeError("mask", "mode 'rollout' attends to a KV cache of earlier blocks: leave mask out or set it "
                             "to block-causal or sink-window")
        if (self.sink_frames or self.window_frames) and self.mask != "sink-window":
            raise ProbeError("sink_frames", f"sink_frames/window_frames apply to mask sink-window only; got mask {self.mask!r}")
        if self.denoising_timesteps is not None:
            steps = list(self.denoising_timesteps)
            if any(t <= 0 for t in steps) or steps != sorted(set(steps), reverse=True):
                raise ProbeError("denoising_timesteps", f"must be distinct values in (0, 1000], descending; got {steps}")
        if len(set(self.samples())) != len(self.samples()):
            raise ProbeError("prompts", "prompts and seeds must not repeat: each (prompt, seed) sample appears once")
        unsupported = [key for key, used in (("mode: rollout", self.mode == "rollout"), ("prompt_embeds", self.prompt_embeds))
                       if used]
        if self.is_population and unsupported:
            raise ProbeError("prompts", "populations (prompts/seeds) run teacher-forced from prompt text; "
                             f"drop {', '.join(unsupported)} or the population")
        late = [s for s in self.capture_steps if resolve_step(s, self.sample_steps) >= self.sample_steps]
        if late:
            raise ProbeError("capture_steps", f"step {late[0]} is out of range: sampling runs steps "
                             f"0-{self.sample_steps - 1} (sample_steps {self.sample_steps})")

    @classmethod
    def from_keys(cls, values: dict[str, Any], **extra: Any) -> "Probe":
        """A probe from YAML keys (``frames``, not ``num_frames``); ``extra`` are attributes."""
        return cls(**{PROBE_ATTRS[key]: value for key, value in values.items()}, **extra)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "Probe":
        return dataclasses.replace(self, **changes)
