"""Section 6: a population extraction against one sample, and the sampling loop that bounds it.

The probe is ``specs/tiny_population.yaml``'s (8 prompts x 2 seeds, 6 steps, logits, mass and
aligned_mass, all 16 samples in one batch) on the already loaded tiny-trained model, with no
extraction cache. Cases, interleaved: ``one-sample`` (the baseline: its first prompt and seed
alone), ``N-samples`` (the population) and ``N-samples/sampling-loop`` (the population's
denoising loop on the stock processors, nothing captured and no dataset: the model's own
compute for N samples, which no change to the harness can go below).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from attn_harness.core.probe import Probe
from attn_harness.core.spec import load_specs
from attn_harness.model.capture import Recorder
from attn_harness.model.models import LoadedModel, load_model
from attn_harness.model.numerics import numerics_policy
from attn_harness.sampling.extract import denoise, extract
from attn_harness.sampling.run import DTYPES, prepare_run
from attn_harness.sampling.samplers import make_sampler
from benchmarks.timing import interleaved, timing_records

SPEC = "tiny_population.yaml"


def population_probe(specs: Path, device: str, prompts: int | None = None, seeds: int | None = None,
                     sample_steps: int | None = None) -> Probe:
    """The population spec's probe on ``device``, optionally cut to fewer prompts, seeds or steps."""
    probe = load_specs(specs / SPEC)[0].probe
    return probe.replace(
        device=device,
        prompts=probe.prompts[:prompts],
        seeds=probe.seeds[:seeds],
        sample_steps=sample_steps or probe.sample_steps,
    )


def sampling_loop(loaded: LoadedModel, probe: Probe) -> Callable[[], None]:
    """The population's denoising loop alone: as many latents through the stock model, nothing captured."""
    samples = len(probe.samples())
    single = probe.replace(prompts=(), seeds=())
    setup = prepare_run(loaded, single)
    latents = setup.noise.repeat(samples, 1, 1, 1, 1)
    branches = {name: value.repeat(samples, 1, 1) for name, value in setup.branches.items()}

    def call() -> None:
        sampler = make_sampler(single, setup.device, torch.Generator().manual_seed(0))
        recorder = Recorder(tokens_per_frame=setup.geo["tokens_per_frame"], metrics=probe.metrics)
        with numerics_policy(probe.dtype, setup.device):
            denoise(loaded.transformer, sampler, latents, branches, recorder, probe, [], [], progress=False)

    return call


def run(probe: Probe, *, reps: int, warmup: int, env: dict) -> list[dict]:
    loaded = load_model("tiny-trained", dtype=DTYPES[probe.dtype], device=torch.device(probe.device))
    prompt, seed = probe.samples()[0]
    one = probe.replace(prompt=prompt, seed=seed, prompts=(), seeds=())
    name = f"{len(probe.samples())}-samples"
    cases = {
        "one-sample": lambda: extract(loaded, one, progress=False),
        name: lambda: extract(loaded, probe, progress=False),
        f"{name}/sampling-loop": sampling_loop(loaded, probe),
    }
    samples = interleaved(cases, reps=reps, warmup=warmup, device=probe.device)
    params = {"model": "tiny-trained", "samples": len(probe.samples()), "sample_batch": probe.sample_batch,
              "sample_steps": probe.sample_steps, "metrics": list(probe.metrics)}
    return timing_records("population", samples, "one-sample", env, params, prefix="population/")
