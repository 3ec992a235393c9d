"""YAML attention specs: schema, loader and validation with file:line for every mistake.

A spec file holds ``specs:``, a list of specs. Each spec names a model source, a probe,
per-layer lists of properties (``attn_harness.core.checks``), an optional baseline and marks; see
``specs/README.md`` for the format. ``load_specs`` validates everything before any model
runs and raises ``SpecError`` ("specs/x.yaml:12: unknown key 'sink_scor' in layers[3] (did
you mean 'sink_score'?)") on the first problem.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from attn_harness.core import checks
from attn_harness.core.calibration import DEFAULT_SIGMAS
from attn_harness.core.errors import HarnessError
from attn_harness.core.probe import Probe

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
DEFAULT_BASELINE_FILE = "baselines/{spec}/layer{layer}.nc"
MARK_NAMES = ("gpu", "slow", "skipif", "xfail")


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
    """A mistake in a spec file, located by file and line."""

    def __init__(self, file: str, line: int, message: str) -> None:
        super().__init__(f"{file}:{line}: {message}")
        self.file = file
        self.line = line
        self.message = message


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
    """SafeLoader recording lines, refusing duplicate keys, and reading ``1e-4`` as a float."""


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
            raise SpecError(loader.name, line, f"a key must be a scalar, got {key!r}") from None
        if seen:
            raise SpecError(loader.name, line, f"duplicate key {key!r} (first at line {out.key_lines[key]})")
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
    finally:
        loader.dispose()


# --------------------------------------------------------------------------- validation helpers


def _line(mapping: Any, key: Any, fallback: int) -> int:
    return getattr(mapping, "key_lines", {}).get(key, getattr(mapping, "line", fallback))


def _suggest(word: str, options: Collection[str]) -> str:
    close = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class _Ctx:
    """Where we are while validating: the file and a readable path such as ``layers[3]``."""

    def __init__(self, file: str) -> None:
        self.file = file

    def fail(self, line: int, message: str) -> SpecError:
        return SpecError(self.file, line, message)

    def mapping(self, value: Any, where: str, line: int, allowed: Collection[str]) -> _Map:
        if not isinstance(value, dict):
            raise self.fail(line, f"{where} must be a mapping; got {type(value).__name__} {value!r}")
        for key in value:
            if key not in allowed:
                raise self.fail(
                    _line(value, key, line),
                    f"unknown key '{key}' in {where}{_suggest(key, allowed)}; allowed: {', '.join(allowed)}",
                )
        return value

    def typed(self, mapping: Mapping, key: str, where: str, kind: str, line: int) -> Any:
        value = mapping[key]
        ok = {
            "str": isinstance(value, str),
            "int": isinstance(value, int) and not isinstance(value, bool),
            "number": isinstance(value, (int, float)) and not isinstance(value, bool),
            "str_list": isinstance(value, list) and all(isinstance(v, str) for v in value),
            "int_list": isinstance(value, list) and len(value) > 0
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value),
            "prompts": isinstance(value, str) or (
                isinstance(value, list) and len(value) > 0 and all(isinstance(v, str) for v in value)
            ),
            "bool": isinstance(value, bool),
            "number_list": isinstance(value, list) and len(value) > 0
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value),
            "steps": isinstance(value, list) and len(value) > 0
            and all((isinstance(v, int) and not isinstance(v, bool)) or v in ("first", "mid", "last") for v in value),
        }[kind]
        if not ok:
            what = {
                "str": "a string",
                "int": "an integer",
                "number": "a number",
                "str_list": "a list of strings",
                "int_list": "a non-empty list of integers",
                "prompts": "a non-empty list of prompts, or a text file with one prompt a line (relative to the spec file)",
                "bool": "true or false",
                "number_list": "a non-empty list of numbers",
                "steps": "a list of step indices or first/mid/last",
            }[kind]
            raise self.fail(_line(mapping, key, line), f"{where}.{key} must be {what}; got {value!r}")
        return value


# probe key in YAML -> (Probe field, kind)
PROBE_KEYS: dict[str, tuple[str, str]] = {
    "prompt": ("prompt", "str"),
    "negative_prompt": ("negative_prompt", "str"),
    "seed": ("seed", "int"),
    "frames": ("num_frames", "int"),
    "height": ("height", "int"),
    "width": ("width", "int"),
    "sample_steps": ("sample_steps", "int"),
    "capture_steps": ("capture_steps", "steps"),
    "guidance": ("guidance", "number"),
    "shift": ("shift", "number"),
    "mask": ("mask", "str"),
    "block_size": ("block_size", "int"),
    "dtype": ("dtype", "str"),
    "device": ("device", "str"),
    "branch": ("branch", "str"),
    "metrics": ("metrics", "str_list"),
    "mode": ("mode", "str"),
    "prompt_embeds": ("prompt_embeds", "str"),
    "sink_frames": ("sink_frames", "int"),
    "window_frames": ("window_frames", "int"),
    "denoising_timesteps": ("denoising_timesteps", "number_list"),
    "warp_timesteps": ("warp_timesteps", "bool"),
    "capture_timesteps": ("capture_timesteps", "number_list"),
    "prompts": ("prompts", "prompts"),
    "seeds": ("seeds", "int_list"),
    "sample_batch": ("sample_batch", "int"),
}
SPEC_KEYS = ("name", "description", "model", "base_model", "probe", "layers", "baseline", "marks")
BASELINE_KEYS = ("file", "layers", "logits", "mass", "aligned_mass", "text_mass", "cross_env", "sigmas")


def parse_layers(value: Any) -> str | tuple[int, ...]:
    """``all``, an integer, ``a-b`` (inclusive) or a comma list of those -> "all" or sorted indices."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return (value,)
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        return tuple(sorted(set(value)))
    if not isinstance(value, str):
        raise ValueError(f"layers must be 'all', an index, a range like 0-29 or a list; got {value!r}")
    text = value.strip()
    if text == "all":
        return "all"
    layers: set[int] = set()
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise ValueError(f"layers must be 'all', an index, a range like 0-29 or a list; got {value!r}")
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) else lo
        if hi < lo:
            raise ValueError(f"layer range {part.strip()!r} runs backwards")
        layers.update(range(lo, hi + 1))
    return tuple(sorted(layers))


def _property_check(ctx: _Ctx, item: Any, where: str, line: int) -> PropertyCheck:
    if isinstance(item, str):
        name, raw, key_line = item, {}, line
    elif isinstance(item, dict) and len(item) == 1:
        name = next(iter(item))
        raw = item[name] if item[name] is not None else {}
        key_line = _line(item, name, line)
    else:
        raise ctx.fail(line, f"{where}: each entry is one property, like '- sink_score: {{sign: positive}}'; got {item!r}")
    if name not in checks.PROPERTIES:
        raise ctx.fail(key_line, f"unknown key '{name}' in {where}{_suggest(name, checks.PROPERTIES)}: "
                       f"properties are {', '.join(checks.PROPERTIES)}")
    if not isinstance(raw, dict):
        raise ctx.fail(key_line, f"{where}.{name} takes a mapping of parameters; got {raw!r}")
    params = dict(raw)
    item_id = params.pop("id", name)
    if not isinstance(item_id, str) or not NAME_PATTERN.match(item_id):
        raise ctx.fail(_line(raw, "id", key_line), f"{where}.{name}.id must be a name of letters, digits, _ . -; got {item_id!r}")
    prop = checks.PROPERTIES[name]
    allowed = [*checks.COMMON_PARAMS, *prop.params, "id"]
    try:
        normalized = checks.normalize_params(name, params)
    except KeyError as err:
        key = err.args[0]
        raise ctx.fail(_line(raw, key, key_line),
                       f"unknown key '{key}' in {where}.{name}{_suggest(key, allowed)}; allowed: {', '.join(allowed)}") from None
    except ValueError as err:
        bad_key = str(err).split(":", 1)[0]
        raise ctx.fail(_line(raw, bad_key, key_line), f"{where}.{name}: {err}") from None
    return PropertyCheck(name=item_id, property=name, params=normalized, line=key_line)


def _groups(ctx: _Ctx, layers: Any, line: int) -> tuple[LayerGroup, ...]:
    if not isinstance(layers, dict) or not layers:
        raise ctx.fail(line, "layers must map layer selections (3, 0-29, all) to lists of properties")
    groups = []
    seen: dict[tuple[int | str, str], int] = {}
    for label, entries in layers.items():
        key_line = _line(layers, label, line)
        where = f"layers[{label}]"
        try:
            selected = parse_layers(label)
        except ValueError as err:
            raise ctx.fail(key_line, str(err)) from None
        if not isinstance(entries, list) or not entries:
            raise ctx.fail(key_line, f"{where} must be a non-empty list of properties")
        item_lines = getattr(entries, "item_lines", [key_line] * len(entries))
        found = tuple(_property_check(ctx, item, where, item_line) for item, item_line in zip(entries, item_lines))
        for check in found:
            for layer in (["all"] if selected == "all" else selected):
                clash = seen.get((layer, check.name))
                if clash:
                    raise ctx.fail(check.line, f"layer {layer} already has a check named '{check.name}' "
                                   f"(line {clash}); give one of them an 'id:'")
                seen[(layer, check.name)] = check.line
        groups.append(LayerGroup(label=str(label), layers=selected, checks=found, line=key_line))
    return tuple(groups)


def _probe(ctx: _Ctx, raw: Any, line: int, layers: str | tuple[int, ...]) -> Probe:
    raw = {} if raw is None else ctx.mapping(raw, "probe", line, PROBE_KEYS)
    if "capture_steps" in raw and "capture_timesteps" in raw:
        raise ctx.fail(_line(raw, "capture_timesteps", line),
                       "probe: give capture_steps or capture_timesteps, not both (capture_timesteps replaces capture_steps)")
    fields: dict[str, Any] = {}
    for key, (field_name, kind) in PROBE_KEYS.items():
        if key in raw:
            value = ctx.typed(raw, key, "probe", kind, line)
            if kind == "prompts" and isinstance(value, str):
                value = _prompts_file(ctx, value, _line(raw, key, line))
            fields[field_name] = tuple(value) if isinstance(value, list) else value
    try:
        return Probe(layers=layers, **fields)
    except HarnessError as err:
        bad = next((key for key in raw if str(err).startswith(PROBE_KEYS[key][0])), None)
        raise ctx.fail(_line(raw, bad, line), f"probe: {err}") from None


def _prompts_file(ctx: _Ctx, name: str, line: int) -> list[str]:
    """The non-empty lines of a prompts file named relative to the spec file."""
    path = Path(ctx.file).parent / name
    try:
        prompts = [text.strip() for text in path.read_text(encoding="utf-8").splitlines() if text.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise ctx.fail(line, f"probe.prompts: cannot read prompts file {path}: {err}") from None
    if not prompts:
        raise ctx.fail(line, f"probe.prompts: {path} holds no prompt (one prompt a line)")
    return prompts


def _tolerance(ctx: _Ctx, raw: Any, var: str, line: int, default: Tolerance | None = None, where: str = "baseline") -> Tolerance:
    default = default or DEFAULT_TOLERANCES[var]
    raw = ctx.mapping(raw, f"{where}.{var}", line, ("atol", "rtol"))
    values = {}
    for key in ("atol", "rtol"):
        if key in raw:
            value = ctx.typed(raw, key, f"{where}.{var}", "number", line)
            if value < 0:
                raise ctx.fail(_line(raw, key, line), f"{where}.{var}.{key} must be >= 0; got {value}")
            values[key] = float(value)
    return Tolerance(atol=values.get("atol", default.atol), rtol=values.get("rtol", default.rtol))


def _baseline(ctx: _Ctx, raw: Any, line: int) -> BaselineSpec | None:
    if raw is False or raw is None:
        return None
    if raw is True:
        raw = _Map()
    raw = ctx.mapping(raw, "baseline", line, BASELINE_KEYS)
    file = ctx.typed(raw, "file", "baseline", "str", line) if "file" in raw else DEFAULT_BASELINE_FILE
    try:
        file.format(spec="s", layer=0)
    except (KeyError, IndexError, ValueError) as err:
        message = f"baseline.file may use {{spec}} and {{layer}} only; got {file!r} ({err})"
        raise ctx.fail(_line(raw, "file", line), message) from None
    layers = None
    if "layers" in raw:
        try:
            layers = parse_layers(raw["layers"])
        except ValueError as err:
            raise ctx.fail(_line(raw, "layers", line), f"baseline.{err}") from None
    tolerances = {
        var: _tolerance(ctx, raw[var], var, _line(raw, var, line)) if var in raw else DEFAULT_TOLERANCES[var]
        for var in DEFAULT_TOLERANCES
    }
    cross_env = None
    if "cross_env" in raw:  # a variable it leaves out keeps its same-environment tolerance
        cross_line = _line(raw, "cross_env", line)
        cross_raw = ctx.mapping(raw["cross_env"], "baseline.cross_env", cross_line, tuple(DEFAULT_TOLERANCES))
        cross_env = {
            var: _tolerance(ctx, cross_raw[var], var, _line(cross_raw, var, cross_line), tolerances[var], "baseline.cross_env")
            if var in cross_raw else tolerances[var]
            for var in DEFAULT_TOLERANCES
        }
    sigmas = DEFAULT_SIGMAS
    if "sigmas" in raw:
        sigmas = float(ctx.typed(raw, "sigmas", "baseline", "number", line))
        if not sigmas > 0 or sigmas == float("inf"):
            raise ctx.fail(_line(raw, "sigmas", line), f"baseline.sigmas must be a positive finite number; got {raw['sigmas']!r}")
    return BaselineSpec(file=file, layers=layers, tolerances=tolerances, line=_line(raw, "file", line) if "file" in raw else line,
                        cross_env=cross_env, sigmas=sigmas)


def _marks(ctx: _Ctx, raw: Any, line: int) -> tuple[MarkSpec, ...]:
    if not isinstance(raw, list):
        raise ctx.fail(line, f"marks must be a list (gpu, slow, skipif, xfail); got {raw!r}")
    marks = []
    for item, item_line in zip(raw, getattr(raw, "item_lines", [line] * len(raw))):
        if isinstance(item, str):
            name, args = item, None
        elif isinstance(item, dict) and len(item) == 1:
            name, args = next(iter(item.items()))
        else:
            raise ctx.fail(item_line, f"a mark is a name or one 'name: arguments' pair; got {item!r}")
        if name not in MARK_NAMES:
            raise ctx.fail(item_line, f"unknown mark '{name}'{_suggest(name, MARK_NAMES)}; marks are {', '.join(MARK_NAMES)}")
        if name in ("gpu", "slow"):
            if args is not None:
                raise ctx.fail(item_line, f"mark {name} takes no arguments")
            marks.append(MarkSpec(name, {}, item_line))
            continue
        if isinstance(args, str):
            args = _Map({"reason": args} if name == "xfail" else {"condition": args})
        allowed = ("condition", "reason") if name == "skipif" else ("reason", "strict")
        args = ctx.mapping(args, f"marks.{name}", item_line, allowed)
        if name == "skipif" and ("condition" not in args or "reason" not in args):
            raise ctx.fail(item_line, "mark skipif needs condition (a Python expression string) and reason")
        for key in args:
            kind = "str" if key != "strict" else None
            if kind:
                ctx.typed(args, key, f"marks.{name}", kind, item_line)
            elif not isinstance(args[key], bool):
                raise ctx.fail(_line(args, key, item_line), f"marks.{name}.strict must be true or false")
        marks.append(MarkSpec(name, dict(args), item_line))
    return tuple(marks)


def _probe_layers(groups: tuple[LayerGroup, ...], baseline: BaselineSpec | None) -> str | tuple[int, ...]:
    """Capture only what the checks and baseline need (every layer if any group says all)."""
    selections = [g.layers for g in groups] + ([baseline.layers] if baseline and baseline.layers else [])
    if "all" in selections:
        return "all"
    return tuple(sorted({layer for s in selections for layer in s}))


def _spec(ctx: _Ctx, raw: Any, line: int, names: dict[str, int]) -> Spec:
    raw = ctx.mapping(raw, "spec", line, SPEC_KEYS)
    for key in ("name", "model", "layers"):
        if key not in raw:
            raise ctx.fail(raw.line, f"spec is missing required key '{key}'")
    name = ctx.typed(raw, "name", "spec", "str", line)
    name_line = _line(raw, "name", line)
    if not NAME_PATTERN.match(name):
        raise ctx.fail(name_line, f"spec name {name!r} must be letters, digits, _ . - (it becomes a test id and a path)")
    if name in names:
        raise ctx.fail(name_line, f"duplicate spec name {name!r} (first at line {names[name]})")
    names[name] = name_line
    model = ctx.typed(raw, "model", "spec", "str", line)
    base_model = ctx.typed(raw, "base_model", "spec", "str", line) if "base_model" in raw else None
    if "description" in raw:
        ctx.typed(raw, "description", "spec", "str", line)
    groups = _groups(ctx, raw["layers"], _line(raw, "layers", line))
    baseline = _baseline(ctx, raw.get("baseline"), _line(raw, "baseline", line))
    probe = _probe(ctx, raw.get("probe"), _line(raw, "probe", line), _probe_layers(groups, baseline))
    for group in groups:
        for check in group.checks:
            if check.params["metric"] not in probe.metrics:
                raise ctx.fail(check.line, f"{check.name} checks '{check.params['metric']}' but the probe captures "
                               f"only {list(probe.metrics)}")
    marks = _marks(ctx, raw["marks"], _line(raw, "marks", line)) if "marks" in raw else ()
    return Spec(name=name, file=ctx.file, line=name_line, model=model, probe=probe, groups=groups,
                baseline=baseline, marks=marks, base_model=base_model)


def load_specs(path: str | os.PathLike, *, display: str | None = None) -> list[Spec]:
    """Read and validate every spec in a YAML file; ``display`` is the path used in messages."""
    path = Path(path)
    file = display or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError(file, 1, f"cannot read spec file: {err}") from None
    data = _parse_yaml(text, file)
    ctx = _Ctx(file)
    if data is None:
        raise ctx.fail(1, "empty spec file: expected 'specs:' with a list of specs (see specs/README.md)")
    data = ctx.mapping(data, "the file", 1, ("specs",))
    specs = data.get("specs")
    specs_line = _line(data, "specs", 1)
    if not isinstance(specs, list) or not specs:
        raise ctx.fail(specs_line, "'specs' must be a non-empty list of specs (see specs/README.md)")
    names: dict[str, int] = {}
    lines = getattr(specs, "item_lines", [specs_line] * len(specs))
    return [_spec(ctx, raw, line, names) for raw, line in zip(specs, lines)]


def resolve_model(raw: str, *, embedded: Collection[str], root: Path,
                  environ: Mapping[str, str] | None = None) -> tuple[str | None, str | None]:
    """``(source, None)`` for a usable model source, or ``(None, reason to skip)``.

    ``${VAR}`` and ``${VAR:-default}`` are substituted from the environment; an embedded
    name is used as is; anything else is a path (relative to ``root``) that must exist.
    """
    env = os.environ if environ is None else environ
    unset = [m.group(1) for m in ENV_PATTERN.finditer(raw) if m.group(1) not in env and m.group(2) is None]
    if unset:
        return None, f"environment variable {unset[0]} is not set (model: {raw!r}); set it to the checkpoint path"
    value = ENV_PATTERN.sub(lambda m: env.get(m.group(1), m.group(2) or ""), raw)
    if value in embedded:
        return value, None
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = root / path
    if not path.exists():
        return None, f"checkpoint path {str(path)!r} does not exist (model: {raw!r})"
    return str(path), None
