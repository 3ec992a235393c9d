"""A small, safe condition language for ``skipif`` marks: spec files are data, never code.

A condition is parsed (never evaluated by Python) into a tree of these forms only:

- names: ``cuda`` (a CUDA device is present), ``platform`` (``sys.platform``: linux, darwin,
  win32), ``python``, ``torch``, ``diffusers`` (installed versions, compared as versions);
- ``env("NAME")``: the variable's value, or ``none`` when it is unset or empty;
- string and number literals, ``none``, ``true``, ``false``;
- comparisons ``== != < <= > >=``, ``in`` / ``not in`` (a list literal or a substring),
  ``and``, ``or``, ``not`` and parentheses.

Examples: ``platform == "darwin"``, ``not cuda``, ``torch < "2.5"``,
``env("CI") == "true" and not cuda``. Anything else (attribute access, calls other than
``env``, unknown names) is refused when the spec loads, with the position.
"""

from __future__ import annotations

import ast
import os
import sys
from collections.abc import Callable, Mapping
from importlib import metadata
from typing import Any

NAMES = ("cuda", "platform", "python", "torch", "diffusers")
_COMPARE: dict[type, Callable[[Any, Any], bool]] = {
    ast.Eq: lambda a, b: a == b,
    ast.NotEq: lambda a, b: a != b,
    ast.Lt: lambda a, b: a < b,
    ast.LtE: lambda a, b: a <= b,
    ast.Gt: lambda a, b: a > b,
    ast.GtE: lambda a, b: a >= b,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}
MAX_LENGTH = 500


class ConditionError(ValueError):
    """A condition outside the language; the message says what is allowed."""


class Version:
    """A version compared numerically with another version or a string ("2.13.0+cpu" > "2.5")."""

    def __init__(self, text: str | None) -> None:
        self.text = text
        parts = []
        for piece in (text or "").split("+")[0].split("."):
            digits = "".join(ch for ch in piece if ch.isdigit()) if piece[:1].isdigit() else ""
            if not digits:
                break
            parts.append(int(digits))
        self.parts = tuple(parts)

    def _other(self, other: Any) -> tuple[int, ...]:
        if isinstance(other, Version):
            return other.parts
        if isinstance(other, (str, int, float)):
            return Version(str(other)).parts
        raise ConditionError(f"a version compares with a version string like \"2.5\"; got {other!r}")

    def __eq__(self, other: Any) -> bool:
        return other is not None and self.text is not None and self.parts == self._other(other)

    def __lt__(self, other: Any) -> bool:
        return self.parts < self._other(other)

    def __le__(self, other: Any) -> bool:
        return self.parts <= self._other(other)

    def __gt__(self, other: Any) -> bool:
        return self.parts > self._other(other)

    def __ge__(self, other: Any) -> bool:
        return self.parts >= self._other(other)

    __hash__ = None  # type: ignore[assignment]


def parse(text: str) -> ast.Expression:
    """Parse and check ``text``; ``ConditionError`` names what is not allowed."""
    if not isinstance(text, str) or not text.strip():
        raise ConditionError("a condition is a non-empty string like 'platform == \"darwin\"'")
    if len(text) > MAX_LENGTH:
        raise ConditionError(f"a condition is at most {MAX_LENGTH} characters")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as err:
        raise ConditionError(f"not a valid condition at column {err.offset}: {text!r}") from None
    called = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    for node in ast.walk(tree):
        _check_node(node, called)
    return tree


def _check_node(node: ast.AST, called: set[int]) -> None:
    allowed = (ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not, ast.Compare, ast.Constant,
               ast.Name, ast.Load, ast.Call, ast.List, ast.Tuple, *_COMPARE)
    if not isinstance(node, allowed):
        raise ConditionError(f"{type(node).__name__} is not allowed in a condition; use names {', '.join(NAMES)}, "
                             "env(\"VAR\"), literals, comparisons, and/or/not")
    if isinstance(node, ast.Name) and node.id == "env" and id(node) in called:
        return
    if isinstance(node, ast.Name) and node.id not in (*NAMES, "none", "true", "false"):
        raise ConditionError(f"unknown name {node.id!r} in a condition; known: {', '.join(NAMES)}, none, true, false")
    if isinstance(node, ast.Call):
        if not (isinstance(node.func, ast.Name) and node.func.id == "env" and len(node.args) == 1 and not node.keywords
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            raise ConditionError('the only call allowed is env("NAME") with a quoted variable name')
    if isinstance(node, ast.Constant) and not isinstance(node.value, (str, int, float, bool, type(None))):
        raise ConditionError(f"literal {node.value!r} is not allowed in a condition")


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _version(dist: str) -> Version:
    try:
        return Version(metadata.version(dist))
    except metadata.PackageNotFoundError:
        return Version(None)


def default_names() -> dict[str, Callable[[], Any]]:
    """Name -> how to compute it (only names a condition uses are computed)."""
    return {
        "cuda": _cuda,
        "platform": lambda: sys.platform,
        "python": lambda: Version(".".join(str(v) for v in sys.version_info[:3])),
        "torch": lambda: _version("torch"),
        "diffusers": lambda: _version("diffusers"),
    }


def evaluate(text: str, *, environ: Mapping[str, str] | None = None,
             names: Mapping[str, Callable[[], Any]] | None = None) -> bool:
    """Whether the condition holds here (``environ`` and ``names`` replace the real ones in tests)."""
    env = os.environ if environ is None else environ
    lookup = default_names() if names is None else names
    return bool(_value(parse(text).body, env, lookup))


def _value(node: ast.AST, env: Mapping[str, str], names: Mapping[str, Callable[[], Any]]) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        literal = {"none": None, "true": True, "false": False}
        return literal[node.id] if node.id in literal else names[node.id]()
    if isinstance(node, ast.Call):
        return env.get(node.args[0].value) or None  # empty is unset
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_value(item, env, names) for item in node.elts]
    if isinstance(node, ast.UnaryOp):
        return not _value(node.operand, env, names)
    if isinstance(node, ast.BoolOp):
        values = (_value(v, env, names) for v in node.values)
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.Compare):
        left = _value(node.left, env, names)
        for op, right_node in zip(node.ops, node.comparators):
            right = _value(right_node, env, names)
            if isinstance(right, Version) and not isinstance(left, Version):
                left, right, op = right, left, _MIRROR.get(type(op), op)
            try:
                holds = _COMPARE[type(op)](left, right)
            except TypeError:
                raise ConditionError(f"cannot compare {left!r} with {right!r}") from None
            if not holds:
                return False
            left = right
        return True
    raise ConditionError(f"{type(node).__name__} is not allowed in a condition")


_MIRROR = {ast.Lt: ast.Gt(), ast.Gt: ast.Lt(), ast.LtE: ast.GtE(), ast.GtE: ast.LtE()}
