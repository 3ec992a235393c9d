"""The one parameter vocabulary: every value a spec, the CLI or the API accepts, declared once.

A ``Field`` says what one parameter is (its kind, default, bounds, meaning). From the fields
the harness derives the YAML validation (``coerce``), the CLI flags (``parse_text`` plus
``coerce``), the JSON Schema of spec files (``json_schema``) and the tables in
``specs/README.md`` (``markdown_table``). Adding a probe parameter is one entry in
``PROBE_FIELDS`` (``attn_harness.core.probe``).

Numbers are finite (NaN or infinity would switch a comparison off), sizes positive and every
field bounded, so a typo cannot turn a check off or allocate without limit. A scalar is
accepted where a one-element list is meant (``heads: 0`` is ``heads: [0]``).
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

REQUIRED = object()  # marks a field without a default
STEP_NAMES = ("first", "mid", "last")
MAX_LAYER = 1023  # largest layer index anywhere (a range is checked before it is expanded)
MAX_INDEX = 4095  # largest head, frame or step index
MAX_TEXT = 10_000  # longest string value
MAX_ITEMS = 10_000  # longest list of strings (e.g. prompts)
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d{1,2})?)$")


class FieldError(ValueError):
    """A bad value for one key; ``key`` names it (no parsing of messages to find it)."""

    def __init__(self, key: str | None, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.message = message


class FieldErrors(ValueError):
    """Every bad key of one mapping at once: ``problems`` is a list of ``FieldError``."""

    def __init__(self, problems: list[FieldError]) -> None:
        super().__init__("; ".join(str(p) for p in problems))
        self.problems = problems


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e20 else f"{value:g}"


def show(value: Any, limit: int = 80) -> str:
    """``repr`` cut to ``limit`` characters (a message never prints a huge or aliased value)."""
    import reprlib

    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxdict, short.maxstring, short.maxother = 3, 6, 6, limit, limit
    text = short.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_layers(value: Any) -> str | tuple[int, ...]:
    """``all``, an index, ``a-b`` (inclusive), or a comma list/YAML list of those -> "all" or sorted unique indices.

    The one layer-list parser of YAML, CLI and API: a reversed range (``3-1``) or an index
    above ``MAX_LAYER`` is an error, duplicates are dropped.
    """
    if is_int(value):
        value = [value]
    if isinstance(value, (list, tuple)):
        if not value or not all(is_int(v) for v in value):
            raise ValueError(f"layers must be 'all', an index, a range like 0-29 or a list; got {show(value)}")
        text = ",".join(str(v) for v in value)
    elif isinstance(value, str):
        text = value.strip()
    else:
        raise ValueError(f"layers must be 'all', an index, a range like 0-29 or a list; got {show(value)}")
    if text == "all":
        return "all"
    layers: set[int] = set()
    for part in text.split(","):
        match = re.fullmatch(r"\s*(-?\d+)\s*(?:-\s*(-?\d+)\s*)?", part)
        if not match:
            raise ValueError(f"layers must be 'all', an index, a range like 0-29 or a list; got {show(value)}")
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) else lo
        if lo < 0 or hi < 0:
            raise ValueError(f"layer indices are >= 0; got {part.strip()!r}")
        if hi < lo:
            raise ValueError(f"layer range {part.strip()!r} runs backwards (write {hi}-{lo})")
        if hi > MAX_LAYER:
            raise ValueError(f"layer {hi} is beyond the largest supported index {MAX_LAYER}")
        layers.update(range(lo, hi + 1))
    return tuple(sorted(layers))


def parse_step(text: str) -> int | str:
    """A step selector on the command line: ``first``, ``mid``, ``last`` or an index."""
    text = text.strip()
    if text in STEP_NAMES:
        return text
    if re.fullmatch(r"\d+", text) and int(text) <= MAX_INDEX:
        return int(text)
    raise ValueError(f"a step is first, mid, last or an index 0-{MAX_INDEX}; got {text!r}")


def resolve_step(selector: int | str, sample_steps: int) -> int:
    """The denoising step a selector names: first = 0, mid = sample_steps // 2, last = sample_steps - 1.

    One meaning of ``mid`` everywhere: the probe's capture steps, ``stats``/``plot``/``compare``
    ``--step`` and the report all use it.
    """
    named = {"first": 0, "mid": sample_steps // 2, "last": sample_steps - 1}
    return named[selector] if isinstance(selector, str) else int(selector)


def step_index(selector: int | str, available: list[int], sample_steps: Any = None) -> int:
    """The captured step a selector names in an extraction (``resolve_step`` when its
    ``sample_steps`` is known; else first/last captured and the middle one)."""
    if not isinstance(selector, str):
        return int(selector)
    steps = sorted(available)
    if is_int(sample_steps) or (isinstance(sample_steps, str) and sample_steps.isdigit()):
        return resolve_step(selector, int(sample_steps))
    if hasattr(sample_steps, "item"):  # a numpy scalar from NetCDF attributes
        return resolve_step(selector, int(sample_steps.item()))
    return {"first": steps[0], "mid": steps[len(steps) // 2], "last": steps[-1]}[selector]


DEFAULT_STEP = "last"  # the step stats, plot, compare and the report show unless told otherwise


@dataclass(frozen=True)
class Field:
    """One parameter: its kind (how values are validated), default, meaning and bounds.

    Kinds: ``str``, ``int``, ``number`` (finite), ``bool``, ``choice``, ``device``,
    ``choices`` (a list of choices), ``int_list``, ``frames``, ``heads`` ('all' or indices),
    ``steps`` ('all' or indices with first/mid/last), ``capture_steps`` (indices or
    first/mid/last), ``layers``, ``numbers`` (finite numbers, each within the bounds), ``strings``, ``type_map`` (head index ->
    one of ``choices``). ``low``/``high`` bound numbers and list entries inclusively;
    ``above`` is an exclusive lower bound.
    """

    kind: str
    default: Any = REQUIRED
    doc: str = ""
    choices: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None
    above: float | None = None
    attr: str | None = None  # the Python attribute, when it differs from the key
    flag: str | None = None  # the CLI flag, when it differs from --key-with-dashes

    # ------------------------------------------------------------------ validation

    def coerce(self, value: Any, key: str | None = None) -> Any:
        """The value in canonical form, or ``FieldError`` saying what was expected."""
        if value is None and self.default is None:
            return None
        kind = self.kind
        try:
            if kind == "str" and isinstance(value, str) and len(value) <= MAX_TEXT:
                return value
            if kind == "number" and is_number(value):
                return float(self._bounded(value))
            if kind == "int" and is_int(value):
                return int(self._bounded(value))
            if kind == "bool" and isinstance(value, bool):
                return value
            if kind == "choice" and isinstance(value, str) and value in self.choices:
                return value
            if kind == "device" and isinstance(value, str) and DEVICE_PATTERN.match(value):
                return value
            if kind == "layers":
                return parse_layers(value)
            if kind == "type_map" and (mapping := self._type_map(value)) is not None:
                return mapping
            items = self._items(value)
            if items is not None:
                return items
        except ValueError as err:
            raise FieldError(key, str(err)) from None
        raise FieldError(key, f"expected {self.describe()}; got {show(value)}")

    def _bounded(self, value: float) -> float:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"must be a finite number; got {value}")
        if self.low is not None and value < self.low:
            raise ValueError(f"must be >= {_num(self.low)}; got {_num(value)}")
        if self.above is not None and value <= self.above:
            raise ValueError(f"must be > {_num(self.above)}; got {_num(value)}")
        if self.high is not None and value > self.high:
            raise ValueError(f"must be <= {_num(self.high)}; got {_num(value)}")
        return value

    def _type_map(self, value: Any) -> dict[int, str] | None:
        """Head index -> one of ``choices`` (e.g. the expected type of each head)."""
        if not isinstance(value, Mapping) or not value:
            return None
        if not all(is_int(h) and 0 <= h <= MAX_INDEX and t in self.choices for h, t in value.items()):
            return None
        return {int(h): t for h, t in value.items()}

    def _items(self, value: Any) -> tuple | str | None:
        kind = self.kind
        if kind in ("heads", "steps") and value == "all":
            return "all"
        if kind == "numbers":  # finite numbers within the bounds, e.g. timesteps
            values = value if isinstance(value, (list, tuple)) else [value]
            if not values and self.default == ():
                return ()
            if not values or not all(is_number(v) for v in values):
                return None
            return tuple(float(self._bounded(v)) for v in values)
        if kind == "strings":  # e.g. prompts: a list of non-empty strings
            if not isinstance(value, (list, tuple)) or len(value) > MAX_ITEMS:
                return None
            if not all(isinstance(v, str) and v.strip() and len(v) <= MAX_TEXT for v in value):
                return None
            return tuple(value) if value or self.default == () else None
        if kind not in ("choices", "int_list", "frames", "heads", "steps", "capture_steps"):
            return None
        if not isinstance(value, (list, tuple)):
            value = [value]  # a scalar where a one-element list is meant
        if not value:
            return () if self.default == () else None
        names = {"steps": STEP_NAMES, "capture_steps": STEP_NAMES, "choices": self.choices}.get(kind, ())
        out = []
        for item in value:
            if isinstance(item, str) and item in names:
                out.append(item)
            elif is_int(item) and kind != "choices":
                high = MAX_INDEX if self.high is None else self.high
                if not (self.low if self.low is not None else 0) <= item <= high:
                    raise ValueError(f"entries must be in {int(self.low or 0)}-{int(high)}; got {item}")
                out.append(int(item))
            else:
                return None
        return tuple(dict.fromkeys(out))  # duplicates dropped, order kept

    # ------------------------------------------------------------------ text: CLI and docs

    def parse_text(self, text: str) -> Any:
        """A command-line string -> the value ``coerce`` expects (lists are comma-separated; an
        integer list also takes ranges like ``0-7``)."""
        kind = self.kind
        text = text.strip()
        if kind == "int":
            return int(text) if re.fullmatch(r"[-+]?\d+", text) else text
        if kind == "number":
            try:
                return float(text)
            except ValueError:
                return text
        if kind == "bool":
            return {"true": True, "false": False}.get(text.lower(), text)
        if kind == "numbers":
            try:
                return [float(p) for p in text.split(",") if p.strip()]
            except ValueError:
                return text
        if kind in ("choices", "int_list", "frames", "heads", "steps", "capture_steps"):
            if text == "all":
                return text
            values: list[Any] = []
            for part in (p.strip() for p in text.split(",") if p.strip()):
                span = re.fullmatch(r"(\d+)-(\d+)", part) if kind == "int_list" else None
                if span and 0 <= int(span[2]) - int(span[1]) <= MAX_INDEX:  # a range like 0-7 (seeds)
                    values.extend(range(int(span[1]), int(span[2]) + 1))
                else:
                    values.append(int(part) if re.fullmatch(r"\d+", part) else part)
            return values
        return text

    def describe(self) -> str:
        what = {
            "str": "a string",
            "number": "a finite number",
            "int": "an integer",
            "bool": "true or false",
            "choice": "one of " + ", ".join(self.choices),
            "device": "auto, cpu, mps, cuda or cuda:N",
            "choices": "a list of " + ", ".join(self.choices),
            "int_list": "an integer or a list of integers",
            "frames": "a latent frame index or a list of them",
            "heads": "'all', a head index or a list of them",
            "steps": "'all', a step index, first, mid, last, or a list of them",
            "capture_steps": "a step index, first, mid, last, or a list of them",
            "layers": "'all', a layer index, a range like 0-29 or a list",
            "numbers": "a finite number or a list of them",
            "strings": "a list of non-empty strings",
            "type_map": "a mapping of head index to one of " + ", ".join(self.choices),
        }[self.kind]
        bounds = self.bounds_text()
        return what + (f" ({bounds})" if bounds else "") + (" or null" if self.default is None else "")

    def bounds_text(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f">= {_num(self.low)}")
        if self.above is not None:
            parts.append(f"> {_num(self.above)}")
        if self.high is not None:
            parts.append(f"<= {_num(self.high)}")
        return ", ".join(parts)

    def default_text(self) -> str:
        if self.default is REQUIRED:
            return "required"
        if self.default is None:
            return "none"
        if isinstance(self.default, tuple):
            return "[" + ", ".join(str(v) for v in self.default) + "]"
        if isinstance(self.default, bool):
            return str(self.default).lower()
        if isinstance(self.default, str):
            return f"{self.default}" if self.default else '""'
        return f"{self.default:g}" if isinstance(self.default, float) else str(self.default)

    # ------------------------------------------------------------------ JSON Schema

    def json_schema(self) -> dict[str, Any]:
        kind = self.kind
        bounds: dict[str, Any] = {}
        if self.low is not None:
            bounds["minimum"] = self.low
        if self.above is not None:
            bounds["exclusiveMinimum"] = self.above
        if self.high is not None:
            bounds["maximum"] = self.high
        index = {"type": "integer", "minimum": int(self.low or 0), "maximum": int(self.high or MAX_INDEX)}
        if kind == "str":
            schema: dict[str, Any] = {"type": "string", "maxLength": MAX_TEXT}
        elif kind == "number":
            schema = {"type": "number", **bounds}
        elif kind == "int":
            schema = {"type": "integer", **bounds}
        elif kind == "bool":
            schema = {"type": "boolean"}
        elif kind == "choice":
            schema = {"enum": list(self.choices)}
        elif kind == "device":
            schema = {"type": "string", "pattern": DEVICE_PATTERN.pattern}
        elif kind == "numbers":
            item_schema = {"type": "number", **bounds}
            schema = {"oneOf": [item_schema, {"type": "array", "items": item_schema, "minItems": 1}]}
        elif kind == "strings":
            text = {"type": "string", "minLength": 1, "maxLength": MAX_TEXT}
            schema = {"type": "array", "items": text, "maxItems": MAX_ITEMS}
        elif kind == "type_map":
            schema = {"type": "object", "minProperties": 1, "propertyNames": {"pattern": r"^\d{1,4}$"},
                      "additionalProperties": {"enum": list(self.choices)}}
        elif kind == "layers":
            schema = {"oneOf": [{"type": "integer", "minimum": 0, "maximum": MAX_LAYER}, {"type": "string"},
                                {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": MAX_LAYER}}]}
        else:
            item: dict[str, Any] = {
                "choices": {"enum": list(self.choices)},
                "int_list": index,
                "frames": index,
                "heads": index,
                "steps": {"oneOf": [index, {"enum": list(STEP_NAMES)}]},
                "capture_steps": {"oneOf": [index, {"enum": list(STEP_NAMES)}]},
            }[kind]
            options = [item, {"type": "array", "items": item, "minItems": 1}]
            if kind in ("heads", "steps"):
                options.insert(0, {"const": "all"})
            schema = {"oneOf": options}
        if self.default is None:
            schema = {"oneOf": [schema, {"type": "null"}]} if "oneOf" not in schema else {
                "oneOf": [*schema["oneOf"], {"type": "null"}]}
        schema["description"] = self.doc
        if self.default not in (REQUIRED, None):
            schema["default"] = list(self.default) if isinstance(self.default, tuple) else self.default
        return schema


def validate(fields: Mapping[str, Field], raw: Mapping[str, Any], *, fill_defaults: bool = True) -> dict[str, Any]:
    """Coerce every key of ``raw`` against ``fields``; ``FieldErrors`` lists every bad key at once.

    An unknown key is a ``FieldError`` whose message starts with ``unknown key``; a missing
    required field names itself. Defaults fill the rest when ``fill_defaults``.
    """
    problems: list[FieldError] = []
    out: dict[str, Any] = {}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(FieldError(str(key), f"unknown key{hint}; known: {', '.join(fields)}"))
    for key, field_ in fields.items():
        if key in raw:
            try:
                out[key] = field_.coerce(raw[key], key)
            except FieldError as err:
                problems.append(err)
        elif field_.default is REQUIRED:
            problems.append(FieldError(key, f"missing required parameter ({field_.doc})"))
        elif fill_defaults:
            out[key] = field_.default
    if problems:
        raise FieldErrors(problems)
    return out


def markdown_table(fields: Mapping[str, Field], *, header: str = "key") -> str:
    """The docs table of ``fields``: key, default, accepted values, meaning."""
    rows = [f"| {header} | default | accepts | meaning |", "|---|---|---|---|"]
    for key, field_ in fields.items():
        rows.append(f"| `{key}` | {field_.default_text()} | {field_.describe()} | {field_.doc} |")
    return "\n".join(rows)
