"""YAML attention specs: schema, loader and validation with file:line for every mistake.

A spec file holds ``specs:``, a list of specs. Each spec names a model source, a probe,
per-layer lists of properties (``attn_harness.core.checks``), an optional baseline and marks; see
``specs/README.md`` for the format. ``load_specs`` validates every value before any model
runs (against the parameter vocabulary, ``attn_harness.core.vocabulary``) and raises one
``SpecError`` listing every problem of the file, each at its line ("specs/x.yaml:12: unknown
key 'sink_scor' in layers[3] (did you mean 'sink_score'?)").
"""

from __future__ import annotations

import difflib
import os
import re
import string
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from attn_harness.core import checks, conditions
from attn_harness.core.calibration import DEFAULT_SIGMAS
from attn_harness.core.errors import HarnessError
from attn_harness.core.probe import PROBE_FIELDS, Probe, ProbeError, read_prompts
from attn_harness.core.vocabulary import Field, FieldError, FieldErrors, parse_layers, show

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
BASELINES_DIR = "baselines"  # every baseline file resolves inside <rootdir>/baselines
DEFAULT_BASELINE_FILE = "baselines/{spec}/layer{layer}.nc"
BASELINE_FILE_PATTERN = re.compile(r"^[A-Za-z0-9_./{}-]+$")
MARK_NAMES = ("gpu", "slow", "skipif", "xfail")
MAX_FILE_BYTES = 1_000_000  # a spec file larger than this is refused before parsing
MAX_ALIASES = 100  # YAML aliases per file (an alias bomb stops here)
SIGMAS_FIELD = Field("number", DEFAULT_SIGMAS, "populations: largest allowed |z| of a cell, in units of the spread",
                     above=0, high=1000)
TOLERANCE_FIELDS: dict[str, Field] = {
    "atol": Field("number", None, "absolute tolerance (default per variable)", low=0, high=10),
    "rtol": Field("number", None, "relative tolerance (default per variable)", low=0, high=1),
}


@dataclass(frozen=True)
class Tolerance:
    """|obtained - baseline| <= atol + rtol * |baseline|, per variable."""

    atol: float
    rtol: float


# Same machine, same torch: extractions of the embedded model repeat bit for bit (measured
# max difference 0.0 over reruns), so these only absorb cross-machine float32 reduction-order
# noise: logits are O(1) block means (atol 1e-4), mass is a probability (atol 1e-5).
DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "logits": Tolerance(atol=1e-4, rtol=1e-4),
    "mass": Tolerance(atol=1e-5, rtol=1e-4),
    "aligned_mass": Tolerance(atol=1e-5, rtol=1e-4),
    "text_mass": Tolerance(atol=1e-5, rtol=1e-4),  # a probability, like mass
}


class SpecError(HarnessError):
    """Mistakes in a spec file, each located by file and line (``line``: the first one)."""

    def __init__(self, file: str, line: int, message: str, *, problems: list[tuple[int, str]] | None = None) -> None:
        self.problems = problems or [(line, message)]
        super().__init__("\n".join(f"{file}:{at}: {text}" for at, text in self.problems))
        self.file = file
        self.line, self.message = self.problems[0]


@dataclass(frozen=True)
class PropertyCheck:
    name: str  # the item name: the property, or its ``id``
    property: str
    params: dict[str, Any]
    line: int


@dataclass(frozen=True)
class LayerGroup:
    label: str
    layers: str | tuple[int, ...]  # "all" or layer indices
    checks: tuple[PropertyCheck, ...]
    line: int


@dataclass(frozen=True)
class BaselineSpec:
    file: str  # template with {spec} and {layer}, relative to the rootdir
    layers: str | tuple[int, ...] | None  # None: every layer the spec checks
    tolerances: dict[str, Tolerance]
    line: int
    cross_env: dict[str, Tolerance] | None = None  # against a baseline made in another environment class
    sigmas: float = DEFAULT_SIGMAS  # populations: largest allowed |z| of a cell (attn_harness.core.calibration)


@dataclass(frozen=True)
class MarkSpec:
    name: str  # gpu | slow | skipif | xfail
    kwargs: dict[str, Any]
    line: int


@dataclass(frozen=True)
class Spec:
    name: str
    file: str
    line: int
    model: str  # as written; resolve with ``resolve_model``
    probe: Probe
    groups: tuple[LayerGroup, ...]
    baseline: BaselineSpec | None
    marks: tuple[MarkSpec, ...] = field(default=())
    base_model: str | None = None  # architecture source for a bare training checkpoint, as written

    def checks_by_layer(self, num_layers: int | None) -> dict[int | str, list[PropertyCheck]]:
        """Checks per layer; ``all`` groups need ``num_layers`` (else they stay under key "all")."""
        found: dict[int | str, list[PropertyCheck]] = {}
        for group in self.groups:
            if group.layers == "all":
                targets: list[int | str] = list(range(num_layers)) if num_layers is not None else ["all"]
            else:
                targets = list(group.layers)
            for layer in targets:
                found.setdefault(layer, []).extend(group.checks)
        return dict(sorted(found.items(), key=lambda kv: (isinstance(kv[0], str), kv[0])))

    def baseline_layers(self, num_layers: int | None) -> list[int | str]:
        if self.baseline is None:
            return []
        chosen = self.baseline.layers
        if chosen is None:
            return list(self.checks_by_layer(num_layers))
        if chosen == "all":
            return list(range(num_layers)) if num_layers is not None else ["all"]
        return list(chosen)

    def baseline_path(self, layer: int | str) -> str:
        """The baseline file of ``layer``, relative to the rootdir (always under ``baselines/``)."""
        assert self.baseline is not None
        return self.baseline.file.format(spec=self.name, layer=layer)


# --------------------------------------------------------------------------- YAML with lines


class _Map(dict):
    """A mapping that remembers the line of itself and of each key (1-based)."""

    line: int
    key_lines: dict


class _Seq(list):
    line: int
    item_lines: list


class _Loader(yaml.SafeLoader):
    """SafeLoader recording lines, refusing duplicate keys and alias bombs, reading ``1e-4`` as a float."""

    aliases = 0

    def compose_node(self, parent, index):  # noqa: ANN001 - PyYAML's signature
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                line = self.peek_event().start_mark.line + 1
                raise SpecError(self.name, line, f"more than {MAX_ALIASES} YAML aliases (*name): "
                                "write the values out or use fewer aliases")
        return super().compose_node(parent, index)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)?\.?[0-9]+[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _construct_map(loader: _Loader, node: yaml.MappingNode) -> _Map:
    loader.flatten_mapping(node)
    out = _Map()
    out.line = node.start_mark.line + 1
    out.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            seen = key in out
        except TypeError:
            raise SpecError(loader.name, line, f"a key must be a scalar, got {show(key)}") from None
        if seen:
            raise SpecError(loader.name, line, f"duplicate key {show(key)} (first at line {out.key_lines[key]})")
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = line
    return out


def _construct_seq(loader: _Loader, node: yaml.SequenceNode) -> _Seq:
    out = _Seq(loader.construct_object(child, deep=True) for child in node.value)
    out.line = node.start_mark.line + 1
    out.item_lines = [child.start_mark.line + 1 for child in node.value]
    return out


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_map)
_Loader.add_constructor("tag:yaml.org,2002:seq", _construct_seq)


def _parse_yaml(text: str, file: str) -> Any:
    loader = _Loader(text)
    loader.name = file
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark else 1
        raise SpecError(file, line, f"not valid YAML: {err.problem or err}") from None
    except (yaml.YAMLError, RecursionError, ValueError, OverflowError) as err:
        raise SpecError(file, 1, f"not valid YAML: {show(str(err), 200)}") from None
    finally:
        loader.dispose()


# --------------------------------------------------------------------------- validation helpers


def _line(mapping: Any, key: Any, fallback: int) -> int:
    try:
        return getattr(mapping, "key_lines", {}).get(key, getattr(mapping, "line", fallback))
    except TypeError:  # an unhashable key
        return fallback


def _suggest(word: str, options: Collection[str]) -> str:
    close = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class _Noted(Exception):
    """A part of the file is invalid and its problems are already noted: skip the part."""


def _word(key: Any) -> str:
    """A key as written, cut short (keys are usually short strings)."""
    return key if isinstance(key, str) and len(key) <= 60 and key.isprintable() else show(key, 60)


class _Ctx:
    """Where we are while validating: the file (as messages name it, and the folder it is in), and every
    problem found so far."""

    def __init__(self, file: str, directory: Path) -> None:
        self.file = file
        self.directory = directory  # files a spec names (a prompts file) are relative to it
        self.problems: list[tuple[int, str]] = []

    def fail(self, line: int, message: str) -> SpecError:
        return SpecError(self.file, line, message)

    def note(self, line: int, message: str) -> None:
        self.problems.append((line, message))

    @contextmanager
    def attempt(self) -> Iterator[None]:
        """Record a ``SpecError`` raised inside and go on with the next part of the file."""
        try:
            yield
        except SpecError as err:
            self.problems.extend(err.problems)
        except _Noted:
            pass

    def raise_problems(self) -> None:
        if self.problems:
            ordered = sorted(dict.fromkeys(self.problems), key=lambda p: p[0])
            raise SpecError(self.file, ordered[0][0], ordered[0][1], problems=ordered)

    def mapping(self, value: Any, where: str, line: int, allowed: Collection[str]) -> _Map:
        """``value`` as a mapping; each unknown key is noted (validation goes on with the rest)."""
        if not isinstance(value, dict):
            raise self.fail(line, f"{where} must be a mapping; got {type(value).__name__} {show(value)}")
        for key in value:
            if key not in allowed:
                self.note(_line(value, key, line),
                          f"unknown key '{_word(key)}' in {where}{_suggest(key, allowed)}; allowed: {', '.join(allowed)}")
        return value

    def field(self, mapping: Mapping, key: str, where: str, field_: Field, line: int) -> Any:
        try:
            return field_.coerce(mapping[key], key)
        except FieldError as err:
            raise self.fail(_line(mapping, key, line), f"{where}.{key}: {err.message}") from None

    def text(self, mapping: Mapping, key: str, where: str, line: int) -> str:
        return self.field(mapping, key, where, Field("str"), line)


SPEC_KEYS = ("name", "description", "model", "base_model", "probe", "layers", "baseline", "marks")
BASELINE_KEYS = ("file", "layers", "logits", "mass", "aligned_mass", "text_mass", "cross_env", "sigmas")


def _property_check(ctx: _Ctx, item: Any, where: str, line: int) -> PropertyCheck:
    if isinstance(item, str):
        name, raw, key_line = item, {}, line
    elif isinstance(item, dict) and len(item) == 1:
        name = next(iter(item))
        raw = item[name] if item[name] is not None else {}
        key_line = _line(item, name, line)
    else:
        raise ctx.fail(line, f"{where}: each entry is one property, like '- sink_score: {{sign: positive}}'; got {show(item)}")
    if not isinstance(name, str) or name not in checks.PROPERTIES:
        raise ctx.fail(key_line, f"unknown key '{_word(name)}' in {where}{_suggest(name, checks.PROPERTIES)}: "
                       f"properties are {', '.join(checks.PROPERTIES)}")
    if not isinstance(raw, dict):
        raise ctx.fail(key_line, f"{where}.{name} takes a mapping of parameters; got {show(raw)}")
    params = dict(raw)
    item_id = params.pop("id", name)
    if not isinstance(item_id, str) or not NAME_PATTERN.match(item_id) or len(item_id) > 100:
        ctx.note(_line(raw, "id", key_line), f"{where}.{name}.id must be a name of letters, digits, _ . -; got {show(item_id)}")
    allowed = [*checks.COMMON_PARAMS, *checks.PROPERTIES[name].params, "id"]
    try:
        normalized = checks.normalize_params(name, params)
    except FieldErrors as errors:
        for err in errors.problems:
            if err.message.startswith("unknown key"):
                ctx.note(_line(raw, err.key, key_line), f"unknown key '{_word(err.key)}' in {where}.{name}"
                         f"{_suggest(err.key, allowed)}; allowed: {', '.join(allowed)}")
            else:
                ctx.note(_line(raw, err.key, key_line), f"{where}.{name}: {err}")
        raise _Noted() from None
    return PropertyCheck(name=item_id, property=name, params=normalized, line=key_line)


def _groups(ctx: _Ctx, layers: Any, line: int) -> tuple[LayerGroup, ...]:
    if not isinstance(layers, dict) or not layers:
        raise ctx.fail(line, "layers must map layer selections (3, 0-29, all) to lists of properties")
    groups = []
    seen: dict[tuple[int | str, str], int] = {}
    ok = True
    for label, entries in layers.items():
        key_line = _line(layers, label, line)
        where = f"layers[{_word(label)}]"
        try:
            selected = parse_layers(label)
        except ValueError as err:
            ctx.note(key_line, str(err))
            ok = False
            continue
        if not isinstance(entries, list) or not entries:
            ctx.note(key_line, f"{where} must be a non-empty list of properties")
            ok = False
            continue
        item_lines = getattr(entries, "item_lines", [key_line] * len(entries))
        found = []
        for item, item_line in zip(entries, item_lines):
            before = len(ctx.problems)
            with ctx.attempt():
                found.append(_property_check(ctx, item, where, item_line))
            ok = ok and len(ctx.problems) == before
        for check in found:
            for layer in (["all"] if selected == "all" else selected):
                clash = seen.get((layer, check.name))
                if clash:
                    ctx.note(check.line, f"layer {layer} already has a check named '{check.name}' "
                             f"(line {clash}); give one of them an 'id:'")
                    ok = False
                    break
                seen[(layer, check.name)] = check.line
        groups.append(LayerGroup(label=str(label), layers=selected, checks=tuple(found), line=key_line))
    if not ok:
        raise _Noted()
    return tuple(groups)


def _probe_values(ctx: _Ctx, raw: Any, line: int) -> dict[str, Any]:
    """Every probe key checked against the vocabulary (each bad key noted at its line)."""
    raw = {} if raw is None else ctx.mapping(raw, "probe", line, PROBE_FIELDS)
    if "capture_steps" in raw and "capture_timesteps" in raw:
        ctx.note(_line(raw, "capture_timesteps", line),
                 "probe: give capture_steps or capture_timesteps, not both (capture_timesteps replaces capture_steps)")
    values: dict[str, Any] = {}
    for key, field_ in PROBE_FIELDS.items():
        if key in raw:
            with ctx.attempt():
                if key == "prompts" and isinstance(raw[key], str):
                    values[key] = _prompts_file(ctx, raw[key], _line(raw, key, line))
                else:
                    values[key] = ctx.field(raw, key, "probe", field_, line)
    return values


def _probe(ctx: _Ctx, raw: Any, line: int, values: dict[str, Any], layers: str | tuple[int, ...]) -> Probe:
    try:
        return Probe.from_keys(values, layers=layers)
    except ProbeError as err:
        raise ctx.fail(_line(raw, err.key, line), f"probe.{err}") from None


def _prompts_file(ctx: _Ctx, name: str, line: int) -> list[str]:
    """The prompts of a file named relative to the spec file."""
    try:
        return read_prompts(ctx.directory / name)
    except ValueError as err:
        raise ctx.fail(line, f"probe.prompts: {err}") from None


def _tolerance(ctx: _Ctx, raw: Any, var: str, line: int, default: Tolerance | None = None, where: str = "baseline") -> Tolerance:
    default = default or DEFAULT_TOLERANCES[var]
    raw = ctx.mapping(raw, f"{where}.{var}", line, TOLERANCE_FIELDS)
    values = {key: ctx.field(raw, key, f"{where}.{var}", field_, line)
              for key, field_ in TOLERANCE_FIELDS.items() if key in raw}
    return Tolerance(atol=values.get("atol", default.atol), rtol=values.get("rtol", default.rtol))


def baseline_file_problem(template: str) -> str | None:
    """Why ``template`` is not a safe baseline path, or None: relative, under ``baselines/``,
    no ``..``, plain ``{spec}`` and ``{layer}`` fields only, ending in ``.nc``."""
    if not BASELINE_FILE_PATTERN.match(template):
        return "may contain letters, digits, _ . - / and the fields {spec} and {layer} only"
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        return f"is not a valid template ({err})"
    fields = [name for _, name, _, _ in parsed if name is not None]
    bad = [name for _, name, spec, conv in parsed if name is not None and (name not in ("spec", "layer") or spec or conv)]
    if bad:
        return f"may use the plain fields {{spec}} and {{layer}} only; got {{{bad[0]}}}"
    if "spec" not in fields or "layer" not in fields:
        return "must contain {spec} and {layer}, so no two specs or layers share a file"
    parts = PurePosixPath(template).parts
    if template.startswith("/") or ".." in parts or "." in template.split("/"):
        return "must be a relative path without '..' or '.'"
    if parts[0] != BASELINES_DIR or len(parts) < 2:
        return f"must lie under {BASELINES_DIR}/ (relative to the rootdir), like {DEFAULT_BASELINE_FILE}"
    if not template.endswith(".nc"):
        return "must end in .nc"
    return None


def _baseline(ctx: _Ctx, raw: Any, line: int) -> BaselineSpec | None:
    if raw is False or raw is None:
        return None
    if raw is True:
        raw = _Map()
    raw = ctx.mapping(raw, "baseline", line, BASELINE_KEYS)
    file = DEFAULT_BASELINE_FILE
    if "file" in raw:
        with ctx.attempt():
            file = ctx.text(raw, "file", "baseline", line)
            problem = baseline_file_problem(file)
            if problem:
                ctx.note(_line(raw, "file", line), f"baseline.file {problem}; got {show(file)}")
    layers = None
    if "layers" in raw:
        try:
            layers = parse_layers(raw["layers"])
        except ValueError as err:
            ctx.note(_line(raw, "layers", line), f"baseline.layers: {err}")
    tolerances = dict(DEFAULT_TOLERANCES)
    for var in DEFAULT_TOLERANCES:
        if var in raw:
            with ctx.attempt():
                tolerances[var] = _tolerance(ctx, raw[var], var, _line(raw, var, line))
    cross_env = None
    if "cross_env" in raw:  # a variable it leaves out keeps its same-environment tolerance
        with ctx.attempt():
            cross_line = _line(raw, "cross_env", line)
            cross_raw = ctx.mapping(raw["cross_env"], "baseline.cross_env", cross_line, tuple(DEFAULT_TOLERANCES))
            cross_env = {
                var: _tolerance(ctx, cross_raw[var], var, _line(cross_raw, var, cross_line), tolerances[var],
                                "baseline.cross_env")
                if var in cross_raw else tolerances[var]
                for var in DEFAULT_TOLERANCES
            }
    sigmas = DEFAULT_SIGMAS
    if "sigmas" in raw:
        with ctx.attempt():
            sigmas = ctx.field(raw, "sigmas", "baseline", SIGMAS_FIELD, line)
    return BaselineSpec(file=file, layers=layers, tolerances=tolerances, line=_line(raw, "file", line) if "file" in raw else line,
                        cross_env=cross_env, sigmas=sigmas)


def _marks(ctx: _Ctx, raw: Any, line: int) -> tuple[MarkSpec, ...]:
    if isinstance(raw, str):
        raw = [raw]  # a scalar where a one-element list is meant
    if not isinstance(raw, list):
        raise ctx.fail(line, f"marks must be a list (gpu, slow, skipif, xfail); got {show(raw)}")
    marks = []
    for item, item_line in zip(raw, getattr(raw, "item_lines", [line] * len(raw))):
        with ctx.attempt():
            marks.append(_mark(ctx, item, item_line))
    return tuple(marks)


def _mark(ctx: _Ctx, item: Any, item_line: int) -> MarkSpec:
    if isinstance(item, str):
        name, args = item, None
    elif isinstance(item, dict) and len(item) == 1:
        name, args = next(iter(item.items()))
    else:
        raise ctx.fail(item_line, f"a mark is a name or one 'name: arguments' pair; got {show(item)}")
    if name not in MARK_NAMES:
        raise ctx.fail(item_line, f"unknown mark '{_word(name)}'{_suggest(name, MARK_NAMES)}; marks are {', '.join(MARK_NAMES)}")
    if name in ("gpu", "slow"):
        if args is not None:
            raise ctx.fail(item_line, f"mark {name} takes no arguments")
        return MarkSpec(name, {}, item_line)
    if isinstance(args, str):
        args = _Map({"reason": args} if name == "xfail" else {"condition": args})
    allowed = ("condition", "reason") if name == "skipif" else ("reason", "strict")
    args = ctx.mapping(args, f"marks.{name}", item_line, allowed)
    if name == "skipif" and ("condition" not in args or "reason" not in args):
        raise ctx.fail(item_line, "mark skipif needs condition (like 'platform == \"darwin\"' or 'not cuda') and reason")
    kwargs = {}
    for key in allowed:
        if key in args:
            field_ = Field("bool") if key == "strict" else Field("str")
            kwargs[key] = ctx.field(args, key, f"marks.{name}", field_, item_line)
    if name == "skipif":
        try:
            conditions.parse(kwargs["condition"])
        except conditions.ConditionError as err:
            raise ctx.fail(_line(args, "condition", item_line), f"marks.skipif.condition: {err}") from None
    return MarkSpec(name, kwargs, item_line)


def _probe_layers(groups: tuple[LayerGroup, ...], baseline: BaselineSpec | None) -> str | tuple[int, ...]:
    """Capture only what the checks and baseline need (every layer if any group says all)."""
    selections = [g.layers for g in groups] + ([baseline.layers] if baseline and baseline.layers else [])
    if "all" in selections:
        return "all"
    return tuple(sorted({layer for s in selections for layer in s}))


def _spec(ctx: _Ctx, raw: Any, line: int, names: dict[str, int]) -> Spec | None:
    """One spec, or None when it has problems (each noted in ``ctx``)."""
    raw = ctx.mapping(raw, "spec", line, SPEC_KEYS)
    before = len(ctx.problems)
    for key in ("name", "model", "layers"):
        if key not in raw:
            ctx.note(raw.line if hasattr(raw, "line") else line, f"spec is missing required key '{key}'")
    name = groups = probe = None
    marks: tuple[MarkSpec, ...] = ()
    if "name" in raw:
        with ctx.attempt():
            name = ctx.text(raw, "name", "spec", line)
            name_line = _line(raw, "name", line)
            if not NAME_PATTERN.match(name) or len(name) > 100:
                name = None
                raise ctx.fail(name_line, f"spec name {show(raw['name'])} must be letters, digits, _ . - "
                               "(at most 100; it becomes a test id and a path)")
            if name in names:
                ctx.note(name_line, f"duplicate spec name {name!r} (first at line {names[name]}): "
                         "names must be unique, they name the tests and the baseline files")
            names.setdefault(name, name_line)
    texts: dict[str, str] = {}
    for key in ("model", "base_model", "description"):
        if key in raw:
            with ctx.attempt():
                texts[key] = ctx.text(raw, key, "spec", line)
    model, base_model = texts.get("model"), texts.get("base_model")
    if "layers" in raw:
        with ctx.attempt():
            groups = _groups(ctx, raw["layers"], _line(raw, "layers", line))
    baseline = None
    with ctx.attempt():
        baseline = _baseline(ctx, raw.get("baseline"), _line(raw, "baseline", line))
    probe_line = _line(raw, "probe", line)
    values = {}
    with ctx.attempt():
        values = _probe_values(ctx, raw.get("probe"), probe_line)
    if "marks" in raw:
        with ctx.attempt():
            marks = _marks(ctx, raw["marks"], _line(raw, "marks", line))
    if len(ctx.problems) > before or name is None or model is None or groups is None:
        return None
    with ctx.attempt():
        probe = _probe(ctx, raw.get("probe"), probe_line, values, _probe_layers(groups, baseline))
    if probe is None:
        return None
    for group in groups:
        for check in group.checks:
            if check.params["metric"] not in probe.metrics:
                ctx.note(check.line, f"{check.name} checks '{check.params['metric']}' but the probe captures "
                         f"only {list(probe.metrics)}")
    if len(ctx.problems) > before:
        return None
    return Spec(name=name, file=ctx.file, line=_line(raw, "name", line), model=model, probe=probe, groups=groups,
                baseline=baseline, marks=marks, base_model=base_model)


def read_spec_text(path: str | os.PathLike, file: str) -> str:
    """The text of a spec file, refusing unreadable, binary or oversized files with one line."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise SpecError(file, 1, f"spec file is larger than {MAX_FILE_BYTES // 1000} kB; split it")
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = "it is a directory" if path.is_dir() else getattr(err, "strerror", None) or "not UTF-8 text"
        raise SpecError(file, 1, f"cannot read spec file: {reason}") from None


def load_specs(path: str | os.PathLike, *, display: str | None = None) -> list[Spec]:
    """Read and validate every spec in a YAML file; ``display`` is the path used in messages.

    Raises one ``SpecError`` with every problem of the file, each at its line.
    """
    file = display or str(path)
    data = _parse_yaml(read_spec_text(path, file), file)
    ctx = _Ctx(file, Path(path).parent)
    if data is None:
        raise ctx.fail(1, "empty spec file: expected 'specs:' with a list of specs (see specs/README.md)")
    data = ctx.mapping(data, "the file", 1, ("specs",))
    specs = data.get("specs")
    specs_line = _line(data, "specs", 1)
    if not isinstance(specs, list) or not specs:
        ctx.note(specs_line, "'specs' must be a non-empty list of specs (see specs/README.md)")
        ctx.raise_problems()
    names: dict[str, int] = {}
    lines = getattr(specs, "item_lines", [specs_line] * len(specs))
    loaded = []
    for raw, line in zip(specs, lines):
        with ctx.attempt():
            loaded.append(_spec(ctx, raw, line, names))
    ctx.raise_problems()
    return [spec for spec in loaded if spec is not None]


def resolve_model(raw: str, *, embedded: Collection[str], root: Path,
                  environ: Mapping[str, str] | None = None) -> tuple[str | None, str | None]:
    """``(source, None)`` for a usable model source, or ``(None, why it is unavailable)``.

    ``${VAR}`` and ``${VAR:-default}`` are substituted from the environment as a shell does
    (an empty variable counts as unset, so ``${VAR:-default}`` gives the default); an
    embedded name is used as is; anything else is a path (relative to ``root``) that must exist.
    """
    env = os.environ if environ is None else environ
    unset = [m.group(1) for m in ENV_PATTERN.finditer(raw) if not env.get(m.group(1)) and m.group(2) is None]
    if unset:
        state = "is empty" if unset[0] in env else "is not set"
        return None, f"environment variable {unset[0]} {state} (model: {raw!r}); set it to the checkpoint path"
    value = ENV_PATTERN.sub(lambda m: env.get(m.group(1)) or m.group(2) or "", raw).strip()
    if not value:
        return None, f"model {raw!r} names no model or path"
    if value in embedded:
        return value, None
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = root / path
    if not path.exists():
        return None, f"checkpoint path {str(path)!r} does not exist (model: {raw!r})"
    return str(path), None
