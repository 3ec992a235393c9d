"""Populations of probes: prompts x seeds as one extraction with a ``sample`` dim, and
properties judged over samples with a confidence bound."""

from __future__ import annotations

import math

import numpy as np
import pytest

from attn_harness.core.checks import run_check, wilson_lower_bound
from attn_harness.core.errors import HarnessError
from attn_harness.core.probe import Probe
from attn_harness.core.schema import REQUIRED_ATTRS, build_dataset
from attn_harness.core.store import read_dataset, write_dataset
from attn_harness.sampling.extract import extract, stack_samples

PROMPTS = ("a red square moving from left to right", "a blue circle moving up")
SHORT = dict(sample_steps=3, capture_steps=("first", "last"))
FRAME_METRICS = ("logits", "mass", "aligned_mass")


@pytest.fixture(scope="module")
def population():
    return extract("tiny-trained", Probe(prompts=PROMPTS, seeds=(0, 1), sample_batch=3, metrics=FRAME_METRICS, **SHORT),
                   progress=False)


def test_population_has_a_sample_dim_with_prompt_and_seed(population):
    assert population["logits"].dims[0] == "sample"
    assert population["prompt"].values.tolist() == [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    assert population["seed"].values.tolist() == [0, 1, 0, 1]
    assert population.attrs["seed"] == [0, 1, 0, 1]


def test_each_sample_equals_its_own_extraction(population):
    # batches of 3 then 1 sample: float32 GEMMs of other shapes sum in another order, so
    # samples agree with single runs to float32 rounding (measured 2.9e-6 on logits up to ~10, 3.0e-7 on mass
    # and 2.7e-7 on aligned_mass); a sample's noise is drawn from (seed, prompt): the single run of that
    # prompt with that noise seed
    probe = Probe(prompts=PROMPTS, seeds=(0, 1))
    for index, (prompt, seed) in enumerate(zip(population["prompt"].values, population["seed"].values)):
        noise_seed = probe.noise_seed(str(prompt), int(seed))
        one = extract("tiny-trained", Probe(prompt=str(prompt), seed=noise_seed, metrics=FRAME_METRICS, **SHORT), progress=False)
        for name in FRAME_METRICS:
            np.testing.assert_allclose(population[name].isel(sample=index).values, one[name].values, atol=2e-5, rtol=1e-5)


def test_a_few_step_population_re_noises_each_sample_as_it_would_alone():
    # the few-step sampler draws fresh noise between steps: each sample from its own generator, so that
    # the batched population equals the single runs (to the float32 rounding of other GEMM shapes, as above)
    few = dict(denoising_timesteps=(1000.0, 750.0, 500.0), capture_steps=("first", "last"))
    probe = Probe(prompts=PROMPTS, seeds=(0, 1), sample_batch=4, metrics=("logits", "mass"), **few)
    population = extract("tiny-trained", probe, progress=False)
    for index, (prompt, seed) in enumerate(probe.samples()):
        alone = Probe(prompt=prompt, seed=probe.noise_seed(prompt, seed), metrics=("logits", "mass"), **few)
        one = extract("tiny-trained", alone, progress=False)
        for name in ("logits", "mass"):
            np.testing.assert_allclose(population[name].isel(sample=index).values, one[name].values, atol=2e-5, rtol=1e-5)
    last = population["logits"].isel(step=-1)
    assert float(abs(last.isel(sample=0) - last.isel(sample=1)).max()) > 1e-3  # the samples' re-noising differs


def test_a_single_prompt_probe_keeps_todays_shape():
    ds = extract("tiny-random", Probe(**SHORT), progress=False)
    assert "sample" not in ds.dims and ds.attrs["seed"] == 0


def test_population_round_trips_through_netcdf_and_needs_its_coords(population, tmp_path):
    back = read_dataset(write_dataset(population, tmp_path / "pop.nc"))
    assert back["prompt"].values.tolist() == population["prompt"].values.tolist()
    np.testing.assert_array_equal(back["logits"].values, population["logits"].values)
    with pytest.raises(HarnessError, match="population needs coordinate 'seed'"):
        write_dataset(population.drop_vars("seed"), tmp_path / "bad.nc")


def test_repeated_samples_and_rollout_populations_are_refused():
    with pytest.raises(HarnessError, match="must not repeat"):
        Probe(prompts=("a", "a"))
    with pytest.raises(HarnessError, match="teacher-forced"):
        Probe(seeds=(0, 1), mode="rollout", mask="block-causal")


def _sink_population(sinks: list[float]):
    """One layer, 2 heads, 6 frames; head 0 of sample i puts ``sinks[i]`` extra logit on frame 0."""
    datasets = []
    for sink in sinks:
        logits = np.zeros((1, 1, 2, 6, 6), dtype=np.float32)
        logits[:, :, 0, :, 0] = sink
        attrs = {**{key: "unknown" for key in REQUIRED_ATTRS}, "mask": "bidirectional", "block_size": 3,
                 "prompt_embedding_fingerprint": "x", "created": "now"}
        datasets.append(build_dataset({"logits": logits}, steps=[0], timesteps=[999.0], layers=[0], attrs=attrs))
    return stack_samples(datasets, [(f"prompt {i}", i) for i in range(len(sinks))])


def test_wilson_bound_solves_its_defining_equation():
    z = 1.6448536269514722  # one-sided 95 %
    for passed, total in [(16, 16), (15, 16), (9, 10), (30, 40), (1, 3)]:
        lower, rate = wilson_lower_bound(passed, total, 0.95), passed / total
        assert lower < rate
        assert (rate - lower) ** 2 == pytest.approx(z * z * lower * (1 - lower) / total, rel=1e-9)
    assert wilson_lower_bound(16, 16, 0.95) == pytest.approx(1 / (1 + z * z / 16))


def test_over_samples_passes_only_when_the_confidence_bound_clears_mostly():
    check = {"expected": [0], "threshold": 0.5, "over": "samples", "mostly": 0.8}
    all_sink = _sink_population([1.0] * 30)
    assert run_check(all_sink, "sink_heads", check).status == "pass"  # bound 0.917 >= 0.8
    one_lost = _sink_population([1.0] * 29 + [0.1])
    assert run_check(one_lost, "sink_heads", check).status == "pass"  # 29/30: bound 0.854
    few = _sink_population([1.0] * 16)
    result = run_check(few, "sink_heads", {**check, "mostly": 0.9})
    assert result.status == "fail"  # 16 of 16 hold, but 16 samples cannot show 90 % at 95 %
    assert "at most 0.855 even if all pass" in result.message


def test_a_failing_population_names_the_samples_that_violate():
    result = run_check(_sink_population([1.0] * 8 + [0.1, 0.2]), "sink_heads",
                       {"expected": [0], "threshold": 0.5, "over": "samples", "mostly": 0.8})
    assert result.status == "fail"
    assert "sample=8 (prompt 'prompt 8', seed 8)" in result.message
    assert "sample=9 (prompt 'prompt 9', seed 9)" in result.message
    assert [v.location["sample"] for v in result.violations] == [8, 9]


def test_without_over_every_sample_s_units_count_and_violations_say_which_sample():
    result = run_check(_sink_population([1.0, 0.1, 1.0]), "sink_heads", {"expected": [0], "threshold": 0.5})
    assert result.status == "fail"
    assert "1 of 6 heads violate" in result.message
    assert result.violations[0].location["sample"] == 1


def test_over_samples_needs_a_population():
    one = _sink_population([1.0]).isel(sample=0, drop=True)
    with pytest.raises(HarnessError, match="over: samples needs a population"):
        run_check(one, "sink_heads", {"expected": [0], "over": "samples"})
    assert math.isfinite(wilson_lower_bound(0, 5, 0.95))


def _random_population(mask: str, samples: int = 5):
    """Random logits, mass, aligned and text mass for 2 steps x 2 layers x 3 heads x 6 frames per sample."""
    rng = np.random.default_rng(3)
    datasets = []
    for _ in range(samples):
        logits = rng.normal(scale=2.0, size=(2, 2, 3, 6, 6))
        if mask == "block-causal":
            logits[..., :3, 3:] = np.nan  # blocks of 3 frames
        mass = np.nan_to_num(np.exp(logits))
        mass /= mass.sum(axis=-1, keepdims=True)
        text = rng.dirichlet(np.ones(5), size=(2, 2, 3, 6))
        attrs = {**{key: "unknown" for key in REQUIRED_ATTRS}, "mask": mask, "block_size": 3,
                 "prompt_embedding_fingerprint": "x", "created": "now"}
        datasets.append(build_dataset({"logits": logits, "mass": mass, "aligned_mass": mass * rng.uniform(size=mass.shape)},
                                      steps=[0, 2], timesteps=[999.0, 500.0], layers=[0, 1], attrs=attrs, text_mass=text))
    return stack_samples(datasets, [(f"prompt {i}", i) for i in range(samples)])


@pytest.mark.parametrize("mask", ["bidirectional", "block-causal"])
def test_one_evaluation_of_all_samples_equals_each_sample_evaluated_alone(mask):
    from attn_harness.core.checks import PROPERTIES, _positional, _select, normalize_params

    population = _random_population(mask)
    cases = [
        ("value_range", {"min": -2, "max": 2}), ("value_range", {"metric": "mass", "max": 0.5}),
        ("sink_score", {"sign": "positive"}), ("sink_score", {"min": -0.5, "max": 0.5}),
        ("diagonal_dominance", {"metric": "mass", "against": "mean"}), ("diagonal_dominance", {"margin": 0.5}),
        ("row_stochastic", {"tol": 1e-7}), ("causal", {"block_size": 2}), ("causal", {"metric": "logits", "block_size": 2}),
        ("temporal_decay", {}), ("temporal_decay", {"exclude_first": False, "tol": 0.2}),
        ("sink_heads", {"expected": [1], "threshold": 0.0}),
        ("head_types", {"expected": {0: "temporal", 2: "sink"}, "temporal": 0.2}), ("head_types", {"stable_across": "steps"}),
        ("text_share", {"tokens": [0, 1], "min": 0.2, "max": 0.6}),
    ]
    failing = 0
    for name, raw in cases:
        prop, params = PROPERTIES[name], normalize_params(name, raw)
        whole = _select(population, params, None)
        extra = {var: _select(population, {**params, "metric": var}, None) for var in prop.uses}
        together = prop.fn(_positional(whole), params, **{k: _positional(v) for k, v in extra.items()})
        alone = [prop.fn(whole.isel(sample=i, drop=True), params, **{k: v.isel(sample=i, drop=True) for k, v in extra.items()})
                 for i in range(population.sizes["sample"])]
        assert together == alone, (name, raw)  # counts, verdict inputs, messages and violations, exactly
        failing += sum(ev.failing for ev in alone)
    assert failing > 0  # the comparison covers violations and their notes


def test_a_text_mass_population_holds_each_sample_s_cross_attention_and_content_tokens(tmp_path):
    probe = Probe(prompts=PROMPTS, seeds=(0,), metrics=("logits", "text_mass"), **SHORT)
    population = extract("tiny-trained", probe, progress=False)
    assert population["text_mass"].dims == ("sample", "step", "layer", "head", "query_frame", "text_token")
    assert population["text_content"].dims == ("sample", "text_token")
    for index, prompt in enumerate(PROMPTS):
        single = Probe(prompt=prompt, seed=probe.noise_seed(prompt, 0), metrics=("logits", "text_mass"), **SHORT)
        one = extract("tiny-trained", single, progress=False)
        np.testing.assert_allclose(population["text_mass"].isel(sample=index).values, one["text_mass"].values, atol=1e-6)
        np.testing.assert_array_equal(population["text_content"].isel(sample=index).values, one["text_content"].values)
    back = read_dataset(write_dataset(population, tmp_path / "text.nc"))
    np.testing.assert_array_equal(back["text_content"].values, population["text_content"].values)
    assert run_check(population, "text_share", {"min": 0.99, "over": "samples", "mostly": 0.2}).status == "pass"


def test_text_share_on_a_population_takes_each_sample_s_own_content_tokens():
    # every query frame sends 1/3 of its text attention to each of tokens 0-2; the first prompt fills tokens 0-1, the second 0-2
    attrs = {**{key: "unknown" for key in REQUIRED_ATTRS}, "mask": "bidirectional", "block_size": 3,
             "prompt_embedding_fingerprint": "x", "created": "now"}
    text = np.zeros((1, 1, 1, 2, 4), dtype=np.float32)
    text[..., :3] = 1 / 3
    datasets = [build_dataset({"logits": np.zeros((1, 1, 1, 2, 2), dtype=np.float32)}, steps=[0], timesteps=[999.0], layers=[0],
                              attrs=attrs, text_mass=text, text_content=content) for content in ([1, 1, 0, 0], [1, 1, 1, 0])]
    result = run_check(stack_samples(datasets, [("a short prompt", 0), ("a longer prompt", 0)]), "text_share",
                       {"metric": "text_mass", "min": 0.9})
    assert result.status == "fail"
    assert {v.location["sample"] for v in result.violations} == {0}
