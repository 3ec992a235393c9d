"""skipif conditions: a small language over env vars, platform, CUDA and versions; never Python eval."""

from __future__ import annotations

import pytest

from attn_harness.core.conditions import ConditionError, Version, evaluate, parse

HERE = {
    "cuda": lambda: False,
    "platform": lambda: "linux",
    "python": lambda: Version("3.11.4"),
    "torch": lambda: Version("2.13.0+cpu"),
    "diffusers": lambda: Version("0.42.1"),
}


@pytest.mark.parametrize(
    ("condition", "holds"),
    [
        ("platform == 'linux'", True),
        ('platform == "darwin"', False),
        ("platform in ['linux', 'darwin']", True),
        ("not cuda", True),
        ("cuda", False),
        ("torch >= '2.5'", True),
        ("torch < '2.5'", False),
        ("'2.5' <= torch", True),
        ("torch >= '2.13.1'", False),
        ("python >= '3.10' and python < '3.12'", True),
        ("diffusers == '0.42.1'", True),
        ('env("CI") == "true"', True),
        ('env("CI") == "true" and not cuda', True),
        ('env("EMPTY") == none', True),  # an empty variable counts as unset
        ('env("UNSET") == none or cuda', True),
        ('env("CI") != none and (cuda or platform == "win32")', False),
        ('"rue" in env("CI")', True),
    ],
)
def test_conditions_evaluate_against_the_environment(condition, holds):
    assert evaluate(condition, environ={"CI": "true", "EMPTY": ""}, names=HERE) is holds


@pytest.mark.parametrize(
    ("condition", "message"),
    [
        ("", "non-empty string"),
        ("x" * 501, "at most 500"),
        ("platform ==", "not a valid condition"),
        ("().__class__.__bases__", "Attribute is not allowed"),
        ("env(name)", "the only call allowed is env"),
        ("print('hi')", "the only call allowed is env"),
        ("lambda: 1", "Lambda is not allowed"),
        ("platform if cuda else 1", "IfExp is not allowed"),
        ("os", "unknown name 'os'"),
        ("1 + 1 == 2", "BinOp is not allowed"),
        ("b'x' == b'x'", "literal b'x' is not allowed"),
    ],
)
def test_anything_outside_the_language_is_refused_before_it_runs(condition, message):
    with pytest.raises(ConditionError, match=message.replace("(", r"\(")):
        parse(condition)


def test_comparing_a_version_with_something_that_is_not_one_is_an_error():
    with pytest.raises(ConditionError, match="version string"):
        evaluate("torch > none", environ={}, names=HERE)
    with pytest.raises(ConditionError, match="cannot compare"):
        evaluate('env("UNSET") < 3', environ={}, names=HERE)


def test_only_the_names_a_condition_uses_are_computed():
    def boom():
        raise AssertionError("computed although unused")

    assert evaluate("platform == 'linux'", environ={}, names={**HERE, "cuda": boom})
