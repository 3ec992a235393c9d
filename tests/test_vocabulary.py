"""One parameter vocabulary: YAML validation, CLI flags, the JSON Schema and the docs tables
are all derived from it, and stay in sync."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jsonschema
import pytest

from attn_harness.cli import build_parser
from attn_harness.core import checks
from attn_harness.core.errors import HarnessError
from attn_harness.core.probe import PROBE_FIELDS, Probe
from attn_harness.core.spec import TOLERANCE_FIELDS, _parse_yaml
from attn_harness.core.spec_schema import json_schema, schema_text
from attn_harness.core.vocabulary import Field, FieldError, markdown_table, parse_layers, resolve_step, step_index

REPO = Path(__file__).resolve().parents[1]
SCHEMA_FILE = REPO / "specs" / "spec.schema.json"


def test_the_committed_schema_is_the_generated_one():
    assert SCHEMA_FILE.read_text(encoding="utf-8") == schema_text(), (
        "specs/spec.schema.json is stale: python -m attn_harness.core.spec_schema specs/spec.schema.json"
    )


def test_the_schema_is_valid_and_accepts_the_shipped_specs():
    validator = jsonschema.Draft202012Validator(json_schema())
    jsonschema.Draft202012Validator.check_schema(json_schema())
    for path in sorted((REPO / "specs").glob("*.yaml")):
        data = _parse_yaml(path.read_text(encoding="utf-8"), str(path))
        assert not [e.message for e in validator.iter_errors(data)], path.name


@pytest.mark.parametrize(
    "mutate",
    [
        lambda spec: spec["probe"].update(sample_steps=0),
        lambda spec: spec["probe"].update(samples=3),
        lambda spec: spec["probe"].update(mask="causal"),
        lambda spec: spec["layers"]["0"].append({"sink_score": {"sing": "positive"}}),
        lambda spec: spec["layers"]["0"].append({"value_range": {"mostly": 1.5}}),
        lambda spec: spec.update(baseline={"logits": {"atol": -1}}),
        lambda spec: spec.update(marks=["fast"]),
    ],
)
def test_the_schema_refuses_what_the_loader_refuses(mutate):
    spec = {"name": "x", "model": "tiny-random", "probe": {"sample_steps": 2}, "layers": {"0": ["causal"]}}
    mutate(spec)
    assert list(jsonschema.Draft202012Validator(json_schema()).iter_errors({"specs": [spec]}))


@pytest.mark.parametrize(
    ("fields", "header"),
    [(PROBE_FIELDS, "probe key"), (checks.COMMON_PARAMS, "parameter"), (TOLERANCE_FIELDS, "tolerance")],
)
def test_the_docs_tables_are_the_vocabulary(fields, header):
    assert markdown_table(fields, header=header) in (REPO / "specs" / "README.md").read_text(encoding="utf-8")


def test_every_probe_field_is_a_cli_flag_and_a_probe_attribute():
    extract = build_parser()._subparsers._group_actions[0].choices["extract"]
    flags = {flag for action in extract._actions for flag in action.option_strings}
    for key, field_ in PROBE_FIELDS.items():
        switch = field_.kind == "bool" and field_.default is True  # --no-warp-timesteps
        assert ("--no-" + key.replace("_", "-") if switch else field_.flag or "--" + key.replace("_", "-")) in flags
        assert hasattr(Probe(), field_.attr or key)


@pytest.mark.parametrize(
    ("field_", "value", "canonical"),
    [
        (Field("number", 0.0, low=0), 3, 3.0),
        (Field("heads", "all"), 2, (2,)),
        (Field("heads", "all"), [3, 1, 3], (3, 1)),
        (Field("capture_steps", ()), "last", ("last",)),
        (Field("choices", (), choices=("logits", "mass")), "logits", ("logits",)),
        (Field("layers", "all"), "0-2, 1", (0, 1, 2)),
        (Field("int", None), None, None),
        (Field("numbers", None, low=0, high=1000), [1000, 750.5], (1000.0, 750.5)),
        (Field("numbers", None, low=0, high=1000), 250, (250.0,)),
    ],
)
def test_values_are_coerced_to_canonical_form(field_, value, canonical):
    assert field_.coerce(value) == canonical


@pytest.mark.parametrize(
    ("field_", "value", "message"),
    [
        (Field("number", 0.0), math.nan, "must be a finite number; got nan"),
        (Field("number", 0.0), -math.inf, "must be a finite number; got -inf"),
        (Field("number", 0.0), True, "expected a finite number"),
        (Field("int", 1, low=1), 0, "must be >= 1; got 0"),
        (Field("int", 1), 1.5, "expected an integer"),
        (Field("heads", "all"), [-1], "entries must be in 0-4095"),
        (Field("heads", "all"), [], "expected 'all', a head index"),
        (Field("str", ""), "x" * 10_001, "expected a string"),
        (Field("device", "auto"), "cuda:x", "expected auto, cpu, mps, cuda or cuda:N"),
        (Field("numbers", None, high=1000), [500, math.nan], "must be a finite number; got nan"),
        (Field("numbers", None, high=1000), [5000], "must be <= 1000; got 5000"),
    ],
)
def test_bad_values_name_what_was_expected(field_, value, message):
    with pytest.raises(FieldError, match=message.replace("(", r"\(")):
        field_.coerce(value, "key")


def test_one_layer_parser_refuses_reversed_ranges_and_drops_duplicates():
    assert parse_layers("0, 3-5") == (0, 3, 4, 5)
    assert parse_layers([2, 2, 0]) == (0, 2)
    for bad in ("3-1,0", "-1", "0-2000", "a", [], [True], 1.5):
        with pytest.raises(ValueError):
            parse_layers(bad)


def test_one_meaning_of_first_mid_last():
    assert [resolve_step(s, 10) for s in ("first", "mid", "last")] == [0, 5, 9]
    assert step_index("mid", [0, 5, 9], 10) == 5
    assert step_index("mid", [0, 3, 7], None) == 3  # a file without sample_steps: the middle captured step
    assert step_index(4, [0, 4], 10) == 4


def test_the_probe_validates_itself_whoever_builds_it():
    with pytest.raises(HarnessError, match="guidance: must be a finite number"):
        Probe(guidance=math.nan)
    with pytest.raises(HarnessError, match="frames: must be >= 1"):
        Probe(num_frames=0)
    assert Probe(mode="rollout").mask == "block-causal"
    with pytest.raises(HarnessError, match="mode 'rollout' attends to a KV cache of earlier blocks"):
        Probe(mode="rollout", mask="bidirectional")
    assert Probe(capture_steps="last", metrics="logits").capture_steps == ("last",)


def test_the_schema_file_is_json_with_the_probe_keys():
    probe = json.loads(SCHEMA_FILE.read_text())["properties"]["specs"]["items"]["properties"]["probe"]
    assert set(probe["properties"]) == set(PROBE_FIELDS)
