"""``attn_harness.testing``: property and baseline assertions inside ordinary pytest functions.

The baseline semantics (missing file written, ``--force-regen``) are run in an inner pytest
session (pytester, in a subprocess: h5py cannot be imported twice in one process), as a user's
test file would see them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from attn_harness.core.errors import HarnessError
from attn_harness.testing import PropertyWarning, assert_property
from tests.test_figures import planted_dataset

pytest_plugins = ["pytester"]
ROOT = Path(__file__).resolve().parent.parent


def test_assert_property_returns_the_result_when_the_property_holds() -> None:
    result = assert_property(planted_dataset(sink_heads=(0, 2)), "sink_heads", layer=1, expected=[0, 2], threshold=1.0)
    assert result.status == "pass"


def test_assert_property_fails_saying_how_many_and_where() -> None:
    ds = planted_dataset(sink_heads=(0, 2))
    with pytest.raises(AssertionError) as failure:
        assert_property(ds, "sink_heads", layer=1, expected=[0], threshold=1.0)
    message = str(failure.value)
    assert "sink_heads on logits: 2 of 8 heads violate (75.0% pass, needs all)" in message
    assert "step=0 layer=1 head=2:" in message and "unlisted head gained a sink" in message
    assert message.endswith("(layer 1)")


def test_a_warn_severity_property_warns_instead_of_failing() -> None:
    ds = planted_dataset(sink_heads=(0, 2))
    with pytest.warns(PropertyWarning, match="2 of 8 heads violate"):
        result = assert_property(ds, "sink_heads", layer=1, expected=[0], threshold=1.0, severity="warn")
    assert result.status == "warn"


def test_a_bad_parameter_is_an_error_not_a_failed_assertion() -> None:
    with pytest.raises(HarnessError, match="diagonal_dominance: margins: unknown key \\(did you mean 'margin'\\?\\)"):
        assert_property(planted_dataset(), "diagonal_dominance", layer=0, margins=0.5)


USER_TEST = '''
from pathlib import Path
from attn_harness.testing import assert_baseline
from tests.test_figures import planted_dataset

def test_layer_1_is_unchanged(request):
    ds = planted_dataset(seed=int(Path("seed.txt").read_text()))
    assert_baseline(ds, Path("baselines") / "layer1.nc", request, layer=1)
'''


@pytest.fixture
def user_project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    pytester.makeini("[pytest]\n")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the user's test imports the planted data helper
    pytester.makepyfile(test_user=USER_TEST)
    (pytester.path / "seed.txt").write_text("0")
    return pytester


def test_assert_baseline_writes_a_missing_baseline_then_passes_on_the_same_data(user_project) -> None:
    first = user_project.runpytest_subprocess("-p", "no:cacheprovider")
    first.assert_outcomes(failed=1)
    first.stdout.fnmatch_lines(["*layer1.nc did not exist: created from this run*"])
    assert (user_project.path / "baselines" / "layer1.nc").is_file()
    user_project.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_assert_baseline_fails_with_how_much_where_and_how_to_regenerate(user_project) -> None:
    user_project.runpytest_subprocess("-p", "no:cacheprovider")  # writes the baseline from seed 0
    (user_project.path / "seed.txt").write_text("1")
    changed = user_project.runpytest_subprocess("-p", "no:cacheprovider")
    changed.assert_outcomes(failed=1)
    changed.stdout.fnmatch_lines([
        "*baselines/layer1.nc differs from this run*",
        "*seed: baseline 0 vs obtained 1*",
        "*logits: * of * cells differ * beyond atol=0.0001 rtol=0.0001*",
        "*max abs diff * at step=* layer=1 head=* query_frame=* key_frame=*",
        "*if the change is intended, regenerate: pytest test_user.py::test_layer_1_is_unchanged --force-regen*",
    ])
    regen = user_project.runpytest_subprocess("-p", "no:cacheprovider", "--force-regen")
    regen.assert_outcomes(failed=1)  # pytest-regressions: a regenerated baseline fails once
    user_project.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)
