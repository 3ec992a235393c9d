"""What importing the pytest plugin costs in a pytest run that has nothing to do with specs.

The plugin loads in every pytest run of an environment where attn-harness is installed, so
its import must stay light. Each case imports pytest first (already paid by any pytest run),
then the plugin module, in a fresh interpreter; the figure is the extra time, median of
``--reps`` rounds run round-robin, next to pytest-regressions' plugin (baseline) in the same run.

    python -m benchmarks.plugin_import --reps 7
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CASES = {
    "pytest-regressions": "pytest_regressions.plugin",
    "attn-harness": "attn_harness.pytest.plugin",
}
CODE = (
    "import time, pytest; start = time.perf_counter(); import {module}; "
    "print(time.perf_counter() - start)"
)


def measure(module: str) -> float:
    # With bytecode caching on, as an installed package has it (the warm-up round writes it).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    done = subprocess.run([sys.executable, "-c", CODE.format(module=module)], capture_output=True, text=True,
                          check=True, env=env)
    return float(done.stdout.strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args(argv)
    times: dict[str, list[float]] = {name: [] for name in CASES}
    for name, module in CASES.items():  # warm-up: the file system cache
        measure(module)
    for _ in range(args.reps):
        for name, module in CASES.items():
            times[name].append(measure(module))
    base = statistics.median(times["pytest-regressions"])
    for name, values in times.items():
        median = statistics.median(values)
        print(json.dumps({"name": f"plugin-import/{name}", "median_s": round(median, 4), "min_s": round(min(values), 4),
                          "max_s": round(max(values), 4), "reps": args.reps, "baseline": "pytest-regressions",
                          "ratio": round(median / base, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
