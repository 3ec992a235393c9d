"""The results record of one ``pytest specs/`` run: what the plugin writes and the report reads.

Typed, torch-free dataclasses serialised to ``results.json``: the run (:class:`RunInfo`), the
specs that extracted (:class:`SpecInfo`) and one :class:`CheckRecord` per check. A baseline
check also carries a :class:`VariableDiff` per compared variable. ``Results.from_dict``
validates a record read back (an unknown status or key is a ``HarnessError`` naming it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from attn_harness.core.atomic import write_atomic
from attn_harness.core.errors import HarnessError

STATUSES: tuple[str, ...] = ("pass", "warn", "fail", "skip", "error")
KINDS: tuple[str, ...] = ("property", "baseline")
RESULTS_FILE = "results.json"


def finite_or_text(value: float) -> float | str:
    """JSON has no NaN or infinity: non-finite floats are written as text ("nan", "inf")."""
    value = float(value)
    return value if math.isfinite(value) else str(value)


@dataclass
class RunInfo:
    command: str = ""
    started: str = ""
    duration_s: float = 0.0
    harness_version: str = ""


@dataclass
class SpecInfo:
    """One spec whose extraction was loaded: where it is written and what produced it."""

    spec: str
    file: str | None = None
    line: int | None = None
    model: str = ""
    probe: dict[str, Any] = field(default_factory=dict)
    dataset: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)  # keys: schema.PROVENANCE_ATTRS


@dataclass
class VariableDiff:
    """How one variable of a baseline check differs: cells beyond ``atol + rtol * |baseline|``.

    Locations are coordinate dicts (step, layer, head, query_frame, key_frame). ``worst``
    lists the worst cells, NaN mismatches first, then by absolute difference.
    """

    variable: str
    cells: int
    beyond: int
    share: float
    nan_mismatch: int
    atol: float
    rtol: float
    max_abs: dict[str, Any]  # value, location, baseline, obtained
    max_rel: dict[str, Any]
    worst: list[dict[str, Any]] = field(default_factory=list)  # location, baseline, obtained, abs_diff


@dataclass
class CheckRecord:
    """One check (property or baseline) of one spec at one layer, with its outcome."""

    # Methods first: the field named ``property`` below shadows the builtin in the class body.
    @property
    def location(self) -> str:
        return f"{self.file or '?'}:{self.line if self.line is not None else '?'}"

    @property
    def check_id(self) -> str:
        """What tells two checks of one layer apart: the last part of the node id."""
        return self.nodeid.rsplit("::", 1)[-1]

    nodeid: str
    spec: str
    status: str
    name: str = ""  # the check's id in the spec (the property name unless ``id:`` is set)
    file: str | None = None
    line: int | None = None
    layer: int | str | None = None
    kind: str = "property"
    property: str = ""
    severity: str = "fail"
    metric: str = ""
    observed: str = ""
    expected: str = ""
    message: str = ""
    violations: list[dict[str, Any]] = field(default_factory=list)
    variables: list[VariableDiff] = field(default_factory=list)
    baseline: str | None = None
    obtained: str | None = None
    regen_command: str | None = None
    duration_s: float = 0.0


@dataclass
class Results:
    run: RunInfo
    specs: list[SpecInfo]
    checks: list[CheckRecord]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Results:
        """Build from a mapping (``results.json``); a missing or unknown key is a ``HarnessError``."""
        missing = [key for key in ("run", "specs", "checks") if key not in data]
        if missing:
            raise HarnessError(f"results record lacks {missing}; expected keys ['run', 'specs', 'checks'] "
                               "(see the pytest plugin)")
        checks = []
        for index, item in enumerate(data["checks"]):
            where = f"results checks[{index}]"
            absent = [key for key in ("nodeid", "spec", "status") if key not in item]
            if absent:
                raise HarnessError(f"{where} lacks {absent}")
            record = _build(CheckRecord, {k: v for k, v in item.items() if k != "variables"}, f"{where} ({item['nodeid']})")
            record.variables = [_build(VariableDiff, v, f"{where}.variables") for v in item.get("variables") or []]
            if record.status not in STATUSES:
                raise HarnessError(f"{where} ({record.nodeid}): status {record.status!r} not in {STATUSES}")
            checks.append(record)
        specs = [_build(SpecInfo, spec, f"results specs[{i}]") for i, spec in enumerate(data["specs"])]
        return cls(run=_build(RunInfo, data["run"], "results run"), specs=specs, checks=checks)

    def write(self, out_dir: Path | str) -> Path:
        """Write ``out_dir/results.json`` atomically."""
        text = json.dumps(self.to_dict(), indent=1, default=str)
        return write_atomic(Path(out_dir) / RESULTS_FILE, text.encode("utf-8"))

    @classmethod
    def read(cls, path: Path | str) -> Results:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise HarnessError(f"{path}: not a readable results record: {err}") from None
        return cls.from_dict(data)


def _build(kind: type, data: Mapping[str, Any], where: str):
    known = {f.name for f in fields(kind)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise HarnessError(f"{where}: unknown keys {unknown}; known keys: {sorted(known)}")
    try:
        return kind(**data)
    except TypeError as err:
        raise HarnessError(f"{where}: {err}") from None
