"""The JSON Schema of spec files, generated from the parameter vocabulary.

Editors (VS Code's YAML extension, JetBrains IDEs) complete and check spec files against it;
``specs/spec.schema.json`` is its committed copy, kept in sync by a test. Regenerate with
``python -m attn_harness.core.spec_schema specs/spec.schema.json``. The loader
(``attn_harness.core.spec``) stays the authority: it also checks what a schema cannot say
(layer ranges, baseline templates, skipif conditions, cross-field rules).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from attn_harness.core import checks
from attn_harness.core.atomic import write_atomic
from attn_harness.core.probe import PROBE_FIELDS
from attn_harness.core.spec import (
    DEFAULT_BASELINE_FILE,
    DEFAULT_TOLERANCES,
    MARK_NAMES,
    NAME_PATTERN,
    SIGMAS_FIELD,
    TOLERANCE_FIELDS,
)
from attn_harness.core.vocabulary import Field

SCHEMA_ID = "https://attn-harness.invalid/spec.schema.json"


def _object(fields: dict[str, Field], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    properties = {key: field_.json_schema() for key, field_ in fields.items()}
    return {"type": "object", "properties": {**properties, **(extra or {})}, "additionalProperties": False}


def _property_entries() -> dict[str, Any]:
    """One entry of a layer's list: a property name, or ``{property: {parameters}}``."""
    options: list[dict[str, Any]] = [{"enum": list(checks.PROPERTIES)}]
    for name, prop in checks.PROPERTIES.items():
        params = _object({**checks.COMMON_PARAMS, **prop.params},
                         {"id": {"type": "string", "pattern": NAME_PATTERN.pattern, "description": "the test name"}})
        params["description"] = prop.formula
        options.append({"type": "object", "properties": {name: {"oneOf": [params, {"type": "null"}]}},
                        "required": [name], "additionalProperties": False})
    return {"oneOf": options}


def json_schema() -> dict[str, Any]:
    """The schema of a spec file (draft 2020-12)."""
    text = {"type": "string"}
    tolerance = _object(TOLERANCE_FIELDS)
    baseline = {
        "oneOf": [
            {"type": "boolean"},
            {"type": "null"},
            _object({}, {
                "file": {"type": "string", "description": "template under baselines/ with {spec} and {layer}",
                         "default": DEFAULT_BASELINE_FILE},
                "layers": Field("layers", None, "layers with a baseline (default: every checked layer)").json_schema(),
                **{var: tolerance for var in DEFAULT_TOLERANCES},
                "cross_env": {**_object({}, {var: tolerance for var in DEFAULT_TOLERANCES}),
                              "description": "tolerances against a baseline written in another environment class"},
                "sigmas": SIGMAS_FIELD.json_schema(),
            }),
        ]
    }
    prompts = {"oneOf": [{"type": "string", "maxLength": 1000,
                          "description": "a text file, one prompt a line, relative to the spec"},
                         PROBE_FIELDS["prompts"].json_schema()]}
    mark = {
        "oneOf": [
            {"enum": ["gpu", "slow"]},
            {"type": "object", "properties": {"xfail": {"oneOf": [text, _object({}, {
                "reason": text, "strict": {"type": "boolean"}})]}}, "required": ["xfail"], "additionalProperties": False},
            {"type": "object", "properties": {"skipif": _object({}, {
                "condition": {"type": "string", "description": "e.g. platform == \"darwin\", not cuda, torch < \"2.5\""},
                "reason": text})}, "required": ["skipif"], "additionalProperties": False},
        ],
        "description": "marks: " + ", ".join(MARK_NAMES),
    }
    spec = {
        "type": "object",
        "required": ["name", "model", "layers"],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "pattern": NAME_PATTERN.pattern, "maxLength": 100,
                     "description": "unique in a run; names the tests and the baseline files"},
            "description": text,
            "model": {"type": "string", "description": "embedded name, a path, or ${ENV_VAR[:-default]}"},
            "base_model": text,
            "probe": {**_object(PROBE_FIELDS, {"prompts": prompts}), "description": "the sampling run and what it captures"},
            "layers": {
                "type": "object",
                "minProperties": 1,
                "description": "layer selection (3, 0-29, 1, 5-7, all) -> list of properties",
                "additionalProperties": {"type": "array", "minItems": 1, "items": _property_entries()},
            },
            "baseline": baseline,
            "marks": {"oneOf": [{"type": "array", "items": mark}, mark]},
        },
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "attn-harness spec file",
        "type": "object",
        "required": ["specs"],
        "additionalProperties": False,
        "properties": {"specs": {"type": "array", "minItems": 1, "items": spec}},
    }


def schema_text() -> str:
    return json.dumps(json_schema(), indent=1, sort_keys=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    target = Path((argv or sys.argv[1:] or ["specs/spec.schema.json"])[0])
    write_atomic(target, schema_text().encode("utf-8"))
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
