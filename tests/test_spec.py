"""Spec files load into validated specs; every mistake is reported with file, line and key."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from attn_harness.core.spec import DEFAULT_TOLERANCES, SpecError, load_specs, parse_layers, resolve_model

GOOD = """\
specs:
  - name: demo
    model: tiny-random
    probe:
      prompt: a cat
      seed: 3
      frames: 33
      sample_steps: 4
      capture_steps: [first, last]
      mask: block-causal
      block_size: 3
    layers:
      all:
        - value_range: {min: -50, max: 50}
      0-1:
        - sink_score: {sign: positive, heads: [0, 2], mostly: 0.5, severity: warn}
      3:
        - row_stochastic
        - causal: {metric: logits}
        - causal: {id: causal-mass, metric: mass}
    baseline:
      logits: {atol: 1e-3}
    marks: [slow, {xfail: "known drift"}]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "x.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def error_of(tmp_path: Path, text: str) -> SpecError:
    with pytest.raises(SpecError) as info:
        load_specs(write(tmp_path, text), display="specs/x.yaml")
    return info.value


def test_a_good_spec_loads_with_probe_checks_baseline_and_marks(tmp_path):
    (spec,) = load_specs(write(tmp_path, GOOD))
    assert spec.name == "demo" and spec.line == 2
    assert spec.probe.seed == 3 and spec.probe.num_frames == 33 and spec.probe.mask == "block-causal"
    assert spec.probe.capture_steps == ("first", "last")
    assert spec.probe.layers == "all"  # an 'all' group captures every layer
    by_layer = spec.checks_by_layer(4)
    assert [c.name for c in by_layer[3]] == ["value_range", "row_stochastic", "causal", "causal-mass"]
    assert [c.name for c in by_layer[1]] == ["value_range", "sink_score"]
    sink = by_layer[0][1]
    assert sink.params["mostly"] == 0.5 and sink.params["severity"] == "warn" and sink.params["heads"] == (0, 2)
    assert sink.line == 16
    assert spec.baseline.tolerances["logits"].atol == pytest.approx(1e-3)  # 1e-3 reads as a float
    assert spec.baseline.tolerances["logits"].rtol == DEFAULT_TOLERANCES["logits"].rtol
    assert spec.baseline_path(3) == "baselines/demo/layer3.nc"
    assert spec.baseline_layers(4) == [0, 1, 2, 3]
    assert [m.name for m in spec.marks] == ["slow", "xfail"] and spec.marks[1].kwargs == {"reason": "known drift"}


def test_probe_captures_only_the_layers_the_spec_checks(tmp_path):
    text = GOOD.replace("      all:\n        - value_range: {min: -50, max: 50}\n", "")
    (spec,) = load_specs(write(tmp_path, text))
    assert spec.probe.layers == (0, 1, 3)


def test_misspelled_property_names_file_line_key_and_suggestion(tmp_path):
    err = error_of(tmp_path, GOOD.replace("- row_stochastic", "- row_stochastc"))
    assert str(err).startswith("specs/x.yaml:18: unknown key 'row_stochastc' in layers[3] (did you mean 'row_stochastic'?)")


def test_misspelled_parameter_names_its_line(tmp_path):
    err = error_of(tmp_path, GOOD.replace("{sign: positive, heads", "{sing: positive, heads"))
    assert err.line == 16
    assert "unknown key 'sing' in layers[0-1].sink_score (did you mean 'sign'?)" in str(err)


def test_misspelled_spec_and_probe_keys(tmp_path):
    assert "unknown key 'modle' in spec (did you mean 'model'?)" in str(error_of(tmp_path, GOOD.replace("    model:", "    modle:")))
    err = error_of(tmp_path, GOOD.replace("sample_steps: 4", "sample_step: 4"))
    assert err.line == 8 and "(did you mean 'sample_steps'?)" in str(err)


@pytest.mark.parametrize(
    ("old", "new", "line", "message"),
    [
        ("seed: 3", "seed: three", 6, "probe.seed must be an integer; got 'three'"),
        ("mask: block-causal", "mask: causal", 10, "probe: mask must be one of"),
        ("{min: -50, max: 50}", "{min: low}", 14, "min: expected a number or null; got 'low'"),
        ("heads: [0, 2]", "heads: 2", 16, "heads: expected 'all' or a list of head indices"),
        ("0-1:", "1-0:", 15, "runs backwards"),
        ("{atol: 1e-3}", "{atol: -1}", 22, "baseline.logits.atol must be >= 0"),
        ("[slow,", "[slwo,", 23, "unknown mark 'slwo' (did you mean 'slow'?)"),
        ("{id: causal-mass, metric: mass}", "{metric: mass}", 20, "layer 3 already has a check named 'causal'"),
        ("model: tiny-random\n", "model: tiny-random\n    model: other\n", 4, "duplicate key 'model' (first at line 3)"),
    ],
)
def test_wrong_values_are_reported_at_their_line(tmp_path, old, new, line, message):
    assert old in GOOD
    err = error_of(tmp_path, GOOD.replace(old, new))
    assert err.line == line, str(err)
    assert message in str(err)


def test_missing_required_key_and_empty_file(tmp_path):
    assert "missing required key 'model'" in str(error_of(tmp_path, GOOD.replace("    model: tiny-random\n", "")))
    assert "empty spec file" in str(error_of(tmp_path, "# nothing\n"))


def test_invalid_yaml_reports_the_line(tmp_path):
    err = error_of(tmp_path, GOOD.replace("prompt: a cat", "prompt: [a cat"))
    assert str(err).startswith("specs/x.yaml:") and "not valid YAML" in str(err)


def test_check_on_a_metric_the_probe_does_not_capture(tmp_path):
    text = GOOD.replace("      block_size: 3\n", "      block_size: 3\n      metrics: [logits]\n")
    assert "row_stochastic checks 'mass' but the probe captures only ['logits']" in str(error_of(tmp_path, text))


@pytest.mark.parametrize(
    ("value", "layers"),
    [(3, (3,)), ("all", "all"), ("0-2", (0, 1, 2)), ("1, 5-6", (1, 5, 6)), ([4, 2], (2, 4))],
)
def test_layer_selections(value, layers):
    assert parse_layers(value) == layers


def test_model_from_env_var_with_default_and_missing(tmp_path):
    embedded = {"tiny-random"}
    assert resolve_model("${M:-tiny-random}", embedded=embedded, root=tmp_path, environ={}) == ("tiny-random", None)
    source, reason = resolve_model("${WAN_CKPT}", embedded=embedded, root=tmp_path, environ={})
    assert source is None and "environment variable WAN_CKPT is not set" in reason
    source, reason = resolve_model("${WAN_CKPT}", embedded=embedded, root=tmp_path, environ={"WAN_CKPT": "nowhere"})
    assert source is None and "nowhere' does not exist" in reason
    (tmp_path / "ckpt").mkdir()
    assert resolve_model("ckpt", embedded=embedded, root=tmp_path, environ={}) == (str(tmp_path / "ckpt"), None)


AUTOREGRESSIVE = GOOD.replace(
    "      capture_steps: [first, last]\n      mask: block-causal\n",
    "      capture_timesteps: [999, 500]\n      mode: rollout\n      mask: sink-window\n      sink_frames: 3\n"
    "      window_frames: 6\n      denoising_timesteps: [1000, 750, 500, 250]\n      warp_timesteps: false\n"
    "      metrics: [logits, mass, text_mass]\n",
).replace("        - row_stochastic\n", "        - row_stochastic\n        - text_share: {min: 0.5}\n")


def test_autoregressive_probe_keys_load(tmp_path):
    (spec,) = load_specs(write(tmp_path, AUTOREGRESSIVE))
    probe = spec.probe
    assert (probe.mode, probe.mask, probe.sink_frames, probe.window_frames) == ("rollout", "sink-window", 3, 6)
    assert probe.denoising_timesteps == (1000, 750, 500, 250) and probe.warp_timesteps is False
    assert probe.capture_timesteps == (999, 500) and "text_mass" in probe.metrics


def test_capture_steps_and_capture_timesteps_together_name_the_line(tmp_path):
    text = AUTOREGRESSIVE.replace("      capture_timesteps: [999, 500]\n", "      capture_timesteps: [999, 500]\n      capture_steps: [0]\n")
    err = error_of(tmp_path, text)
    assert err.line == 9 and "capture_steps or capture_timesteps, not both" in str(err)


def test_bad_autoregressive_values_name_their_key(tmp_path):
    err = error_of(tmp_path, AUTOREGRESSIVE.replace("warp_timesteps: false", "warp_timesteps: 2"))
    assert "probe.warp_timesteps must be true or false" in str(err)
    err = error_of(tmp_path, AUTOREGRESSIVE.replace("[1000, 750, 500, 250]", "[250, 500]"))
    assert "denoising_timesteps must be distinct values in (0, 1000], descending" in str(err)
    err = error_of(tmp_path, AUTOREGRESSIVE.replace("metrics: [logits, mass, text_mass]", "metrics: [logits, mass]"))
    assert "text_share checks 'text_mass' but the probe captures only ['logits', 'mass']" in str(err)
