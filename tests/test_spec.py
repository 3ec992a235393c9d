"""Spec files load into validated specs; every mistake is reported with file, line and key."""

from __future__ import annotations

import textwrap
import time
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
    error = error_of(tmp_path, GOOD.replace("    model:", "    modle:"))
    assert "unknown key 'modle' in spec (did you mean 'model'?)" in str(error)
    err = error_of(tmp_path, GOOD.replace("sample_steps: 4", "sample_step: 4"))
    assert err.line == 8 and "(did you mean 'sample_steps'?)" in str(err)


@pytest.mark.parametrize(
    ("old", "new", "line", "message"),
    [
        ("seed: 3", "seed: three", 6, "probe.seed: expected an integer (>= 0, <= 9223372036854775807); got 'three'"),
        ("mask: block-causal", "mask: causal", 10, "probe.mask: expected one of bidirectional, block-causal"),
        ("{min: -50, max: 50}", "{min: low}", 14, "min: expected a finite number or null; got 'low'"),
        ("heads: [0, 2]", "heads: [a]", 16, "heads: expected 'all', a head index or a list of them"),
        ("0-1:", "1-0:", 15, "runs backwards"),
        ("{atol: 1e-3}", "{atol: -1}", 22, "baseline.logits.atol: must be >= 0; got -1"),
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


# --------------------------------------------------------------------------- no value switches a check off


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("{atol: 1e-3}", "{atol: .nan}", "baseline.logits.atol: must be a finite number; got nan"),
        ("{atol: 1e-3}", "{rtol: .inf}", "baseline.logits.rtol: must be a finite number; got inf"),
        ("{min: -50, max: 50}", "{min: .nan}", "min: must be a finite number; got nan"),
        ("mostly: 0.5", "mostly: .nan", "mostly: must be a finite number"),
        ("seed: 3", "seed: 18446744073709551616", "probe.seed: must be <= 9223372036854775807"),
        ("frames: 33", "frames: 0", "probe.frames: must be >= 1; got 0"),
        ("sample_steps: 4", "sample_steps: 100000000", "probe.sample_steps: must be <= 1000"),
        ("block_size: 3", "block_size: 0", "probe.block_size: must be >= 1"),
        ("prompt: a cat", "prompt: a cat\n      guidance: .nan", "probe.guidance: must be a finite number"),
        ("prompt: a cat", "prompt: a cat\n      shift: .nan", "probe.shift: must be a finite number"),
        ("prompt: a cat", "prompt: a cat\n      height: 0", "probe.height: must be >= 16"),
        ("capture_steps: [first, last]", "capture_steps: [first, 7]", "probe.capture_steps: step 7 is out of range"),
        ("0-1:", "0-99999999:", "beyond the largest supported index"),
        ("0-1:", "3-1, 0:", "'3-1' runs backwards"),
    ],
)
def test_values_that_would_switch_a_check_off_are_refused(tmp_path, old, new, message):
    assert old in GOOD
    assert message in str(error_of(tmp_path, GOOD.replace(old, new, 1)))


def test_every_problem_of_a_file_is_reported_at_once_each_at_its_line(tmp_path):
    text = (GOOD.replace("seed: 3", "seed: -1")
            .replace("sample_steps: 4", "sample_stepz: 4")
            .replace("{min: -50, max: 50}", "{min: .nan}")
            .replace("- row_stochastic", "- row_stochastc")
            .replace("[slow,", "[slwo,"))
    err = error_of(tmp_path, text)
    assert [line for line, _ in err.problems] == [6, 8, 14, 18, 23]
    lines = str(err).splitlines()
    assert len(lines) == 5 and all(line.startswith("specs/x.yaml:") for line in lines)
    assert "probe.seed: must be >= 0" in lines[0] and "unknown key 'sample_stepz'" in lines[1]


def test_scalars_are_accepted_where_one_element_lists_are_meant(tmp_path):
    text = (GOOD.replace("capture_steps: [first, last]", "capture_steps: last")
            .replace("heads: [0, 2]", "heads: 0")
            .replace("marks: [slow, {xfail: \"known drift\"}]", "marks: slow"))
    (spec,) = load_specs(write(tmp_path, text))
    assert spec.probe.capture_steps == ("last",)
    assert spec.checks_by_layer(4)[0][1].params["heads"] == (0,)
    assert [m.name for m in spec.marks] == ["slow"]


@pytest.mark.parametrize(
    "file",
    [
        "/etc/{spec}/{layer}.nc",
        "baselines/../{spec}/{layer}.nc",
        "baselines/{layer.__class__}/{spec}.nc",
        "baselines/{spec!r}/{layer}.nc",
        "baselines/{spec:>9}/{layer}.nc",
        "baselines/{spec}.nc",
        "golden/{spec}/{layer}.nc",
        "baselines/{spec}/{layer}.txt",
        "baselines/{spec}/{0}.nc",
        "baselines\\\\{spec}\\\\{layer}.nc",
    ],
)
def test_baseline_files_stay_inside_the_baselines_directory(tmp_path, file):
    text = GOOD.replace("      logits: {atol: 1e-3}", f"      file: '{file}'\n      logits: {{atol: 1e-3}}")
    err = error_of(tmp_path, text)
    assert err.line == 22 and "baseline.file" in str(err)


def test_a_yaml_alias_bomb_is_refused_quickly(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 12)]
    text = "\n".join(lines) + "\nspecs: *a11\n"
    started = time.perf_counter()
    err = error_of(tmp_path, text)
    assert "more than 100 YAML aliases" in str(err)
    assert time.perf_counter() - started < 30  # a generous bound: the unbounded version never returns


def test_an_aliased_value_in_a_message_is_cut_short(tmp_path):
    text = "big: &big [" + ", ".join(["word"] * 500) + "]\nspecs:\n  - name: demo\n    model: *big\n    layers: {0: [causal]}\n"
    err = error_of(tmp_path, text)
    assert "spec.model: expected a string" in str(err) and len(str(err)) < 300


def test_duplicate_spec_names_in_one_file_are_refused(tmp_path):
    text = GOOD + GOOD.split("specs:\n", 1)[1]
    err = error_of(tmp_path, text)
    assert "duplicate spec name 'demo' (first at line 2)" in str(err)


def test_an_empty_variable_counts_as_unset(tmp_path):
    embedded = {"tiny-random"}
    assert resolve_model("${M:-tiny-random}", embedded=embedded, root=tmp_path, environ={"M": ""}) == ("tiny-random", None)
    source, reason = resolve_model("${WAN_CKPT}", embedded=embedded, root=tmp_path, environ={"WAN_CKPT": ""})
    assert source is None and "WAN_CKPT is empty" in reason


@pytest.mark.parametrize(
    ("condition", "message"),
    [
        ("__import__('os').system('touch pwned')", "the only call allowed is env"),
        ("open('x').read()", "the only call allowed is env"),
        ("sys.platform == 'darwin'", "Attribute is not allowed"),
        ("platfrom == 'linux'", "unknown name 'platfrom'"),
        ("[x for x in ()]", "ListComp is not allowed"),
    ],
)
def test_skipif_conditions_are_data_not_code(tmp_path, condition, message):
    text = GOOD.replace('marks: [slow, {xfail: "known drift"}]',
                        f'marks: [{{skipif: {{condition: "{condition}", reason: r}}}}]')
    err = error_of(tmp_path, text)
    assert err.line == 23 and message in str(err)
    assert not (tmp_path / "pwned").exists()

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
    text = AUTOREGRESSIVE.replace("      capture_timesteps: [999, 500]\n",
                                  "      capture_timesteps: [999, 500]\n      capture_steps: [0]\n")
    err = error_of(tmp_path, text)
    assert err.line == 9 and "capture_steps or capture_timesteps, not both" in str(err)


def test_bad_autoregressive_values_name_their_key(tmp_path):
    err = error_of(tmp_path, AUTOREGRESSIVE.replace("warp_timesteps: false", "warp_timesteps: 2"))
    assert "probe.warp_timesteps: expected true or false" in str(err)
    err = error_of(tmp_path, AUTOREGRESSIVE.replace("[1000, 750, 500, 250]", "[250, 500]"))
    assert "denoising_timesteps: must be distinct values in (0, 1000], descending" in str(err)
    err = error_of(tmp_path, AUTOREGRESSIVE.replace("metrics: [logits, mass, text_mass]", "metrics: [logits, mass]"))
    assert "text_share checks 'text_mass' but the probe captures only ['logits', 'mass']" in str(err)


def test_a_prompts_file_is_read_beside_the_spec_and_a_missing_or_empty_one_names_its_line(tmp_path):
    (tmp_path / "prompts.txt").write_text("a cat\n\n  a dog  \n")
    spec = load_specs(write(tmp_path, GOOD.replace("prompt: a cat", "prompts: prompts.txt")))[0]
    assert spec.probe.prompts == ("a cat", "a dog")
    err = error_of(tmp_path, GOOD.replace("prompt: a cat", "prompts: missing.txt"))
    assert err.line == 5 and "probe.prompts: " in str(err) and f"{tmp_path / 'missing.txt'}': cannot read it" in str(err)
    (tmp_path / "blank.txt").write_text("\n \n")
    err = error_of(tmp_path, GOOD.replace("prompt: a cat", "prompts: blank.txt"))
    assert err.line == 5 and "blank.txt': holds no prompt (one prompt a line)" in str(err)
    # named relative to the spec file, not to the working directory or the name messages use
    assert load_specs(write(tmp_path, GOOD.replace("prompt: a cat", "prompts: prompts.txt")), display="specs/x.yaml")
