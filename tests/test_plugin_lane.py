"""The plugin stays in its lane: it claims only spec files, imports nothing heavy until one is
collected, never deletes what it did not write, and under --attn-strict a missing model,
variable or device fails the run instead of skipping it."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from attn_harness.pytest.plugin import is_spec_file

pytest_plugins = ["pytester"]

PLUGIN_ARGS = ([] if any(ep.name == "attn_harness" for ep in entry_points(group="pytest11"))
               else ["-p", "attn_harness.pytest.plugin"])

OPENAPI = """\
openapi: 3.0.0
info: {title: pets, version: "1"}
paths:
  /pets:
    get:
      responses: {"200": {description: ok}}
"""

SPEC = """\
specs:
  - name: {name}
    model: {model}
    probe: {{sample_steps: 1, capture_steps: [first]}}
    layers:
      0:
        - value_range: {{min: -5, max: 5}}
    baseline: false
{marks}"""


def spec_text(name: str = "lane", model: str = "tiny-random", marks: str = "") -> str:
    return SPEC.format(name=name, model=model, marks=marks)


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(*PLUGIN_ARGS, "-p", "no:cacheprovider", *args)


def test_an_unrelated_project_runs_unaffected(pytester):
    """An OpenAPI file under api/specs/ is left alone; the run writes no cache and no report."""
    pytester.makeini("[pytest]\n")
    (pytester.path / "api" / "specs").mkdir(parents=True)
    (pytester.path / "api" / "specs" / "openapi.yaml").write_text(OPENAPI)
    pytester.makepyfile(test_pets="def test_pets():\n    assert 1 + 1 == 2\n")
    result = run(pytester)
    result.assert_outcomes(passed=1)
    assert result.ret == 0
    pytester_own = ("runpytest-0", "runpytest-current", "stdout", "stderr", "__pycache__")
    left = sorted(str(p.relative_to(pytester.path)) for p in pytester.path.rglob("*")
                  if not set(p.relative_to(pytester.path).parts) & set(pytester_own))
    assert left == ["api", "api/specs", "api/specs/openapi.yaml", "test_pets.py", "tox.ini"]
    assert (pytester.path / "api" / "specs" / "openapi.yaml").read_text() == OPENAPI


def test_which_files_are_claimed(pytester):
    pytester.makeini("[pytest]\nattn_specs = conf/checks\n")
    files = {
        "api/specs/openapi.yaml": OPENAPI,  # a folder named specs is not enough
        "myspecs/x.yaml": spec_text(),  # a spec anywhere, by its content
        "conf/checks/odd.yml": "not: a spec\n",  # under attn_specs: always a spec (and its errors are shown)
        "named.yaml": "something: else\n",  # named on the command line (below)
        "notes.txt": spec_text(),  # not YAML
    }
    for name, text in files.items():
        (pytester.path / name).parent.mkdir(parents=True, exist_ok=True)
        (pytester.path / name).write_text(text)
    config = pytester.parseconfig(str(pytester.path / "named.yaml"))
    claimed = {name for name in files if is_spec_file(pytester.path / name, config)}
    assert claimed == {"myspecs/x.yaml", "conf/checks/odd.yml", "named.yaml"}


def test_importing_the_plugin_imports_nothing_heavy():
    code = ("import sys, pytest; import attn_harness.pytest.plugin; "
            "print(sorted(m for m in ('torch', 'xarray', 'numpy', 'yaml', 'diffusers', 'matplotlib') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_a_spec_outside_specs_named_on_the_command_line_is_collected(pytester):
    pytester.makeini("[pytest]\n")
    (pytester.path / "elsewhere").mkdir()
    (pytester.path / "elsewhere" / "x.yaml").write_text(
        spec_text(marks="    marks: [{skipif: {condition: \"true\", reason: always}}]\n"))
    result = run(pytester, "elsewhere/x.yaml", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*always (skipif: true)*"])


def test_missing_model_skips_by_default_and_fails_under_strict(pytester, monkeypatch):
    monkeypatch.delenv("WAN_CKPT_TYPO", raising=False)
    pytester.makeini("[pytest]\n")
    (pytester.path / "specs").mkdir()
    (pytester.path / "specs" / "x.yaml").write_text(spec_text(model="${WAN_CKPT_TYPO}"))
    run(pytester, "specs").assert_outcomes(skipped=1)
    result = run(pytester, "specs", "--attn-strict")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*specs/x.yaml:2: spec 'lane': environment variable WAN_CKPT_TYPO is not set*--attn-strict*"])
    assert "Traceback" not in result.stdout.str()
    pytester.makeini("[pytest]\nattn_strict = true\n")
    assert run(pytester, "specs").ret == pytest.ExitCode.INTERRUPTED


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_a_gpu_spec_without_cuda_fails_under_strict(pytester):
    pytester.makeini("[pytest]\nattn_strict = true\n")
    (pytester.path / "specs").mkdir()
    (pytester.path / "specs" / "x.yaml").write_text(spec_text(marks="    marks: [gpu]\n"))
    result = run(pytester, "specs")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*is marked gpu and no CUDA device is present*"])


def test_two_files_defining_one_spec_name_are_refused(pytester):
    pytester.makeini("[pytest]\n")
    (pytester.path / "specs").mkdir()
    for name in ("a.yaml", "b.yaml"):
        (pytester.path / "specs" / name).write_text(spec_text(name="twin"))
    result = run(pytester, "specs", "--collect-only")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*specs/b.yaml:2: spec name 'twin' is also defined at specs/a.yaml:2*"])


def test_cache_clear_on_the_checkout_deletes_nothing(pytester):
    pytester.makeini("[pytest]\n")
    (pytester.path / ".git").mkdir()
    (pytester.path / "README.md").write_text("precious")
    result = run(pytester, "--attn-cache", ".", "--attn-cache-clear")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--attn-cache-clear: refusing to clear*not an attn-harness cache*"])
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    assert (pytester.path / "README.md").read_text() == "precious" and (pytester.path / ".git").is_dir()


@pytest.mark.parametrize("option", ["--attn-report", "--attn-cache", "--attn-results"])
def test_a_file_given_for_a_directory_option_is_one_line(pytester, option):
    pytester.makeini("[pytest]\n")
    (pytester.path / "taken").write_text("mine")
    result = run(pytester, option, "taken")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{option} taken: is a file; give a directory*"])
    assert (pytester.path / "taken").read_text() == "mine"


def test_a_baselines_symlink_leading_outside_is_refused(pytester, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    pytester.makeini("[pytest]\n")
    (pytester.path / "specs").mkdir()
    (pytester.path / "baselines").mkdir()
    (pytester.path / "baselines" / "lane").symlink_to(outside, target_is_directory=True)
    (pytester.path / "specs" / "x.yaml").write_text(spec_text().replace("baseline: false", "baseline: {}"))
    result = run(pytester, "specs", "--collect-only")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*baseline file baselines/lane/layer0.nc resolves to*outside*"])
    assert list(Path(outside).iterdir()) == []
