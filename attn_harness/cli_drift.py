"""``attn-harness drift``: how far two extractions, or one spec run in two environments, are apart.

    attn-harness drift a.nc b.nc [--json]
    attn-harness drift --spec specs/tiny_default.yaml --name tiny-default --env ATEN_CPU_CAPABILITY=avx2
        [--env OMP_NUM_THREADS=1 ...] [--base-env KEY=VALUE ...] [--keep DIR] [--json]

With ``--spec`` the spec's extraction runs twice in fresh processes: under the current environment
plus ``--base-env``, and plus ``--env``; ``--keep DIR`` keeps both files (``base.nc``, ``env.nc``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from attn_harness.core.errors import HarnessError


def add_drift(sub) -> None:
    p = sub.add_parser(
        "drift",
        help="largest abs/rel difference per variable between two extractions or two environments",
        description="Print, per variable, the largest absolute and relative difference between two "
        "extractions of the same probe and where it is (step, layer, head, frames), with the "
        "environment attrs that differ. With --spec, run one spec in two environments first.",
    )
    p.add_argument("files", nargs="*", type=Path, help="two NetCDF extractions (a b), or none with --spec")
    p.add_argument("--spec", type=Path, default=None, help="a spec file: run --name in two environments")
    p.add_argument("--name", default=None, help="the spec's name (with --spec)")
    p.add_argument("--env", action="append", default=None, metavar="KEY=VALUE",
                   help="environment override of the second run, e.g. ATEN_CPU_CAPABILITY=avx2 (repeatable)")
    p.add_argument("--base-env", action="append", default=None, metavar="KEY=VALUE",
                   help="environment override of the first run (repeatable)")
    p.add_argument("--keep", type=Path, default=None, metavar="DIR", help="keep the two extractions in DIR")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_drift)


def cmd_drift(args: argparse.Namespace) -> int:
    from attn_harness.core.drift import drift_record, format_drift
    from attn_harness.core.store import read_dataset

    if args.spec is None:
        if len(args.files) != 2:
            raise HarnessError("drift needs two extraction files (a.nc b.nc), or --spec FILE --name NAME --env KEY=VALUE")
        a_path, b_path = args.files
        a, b = read_dataset(a_path), read_dataset(b_path)
        labels = (str(a_path), str(b_path))
    else:
        a, b, labels = _run_spec_twice(args)
    try:
        if args.json:
            print(json.dumps({"a": labels[0], "b": labels[1], **drift_record(a, b)}))
        else:
            print(format_drift(a, b, labels))
    except ValueError as err:
        raise HarnessError(f"{labels[0]} vs {labels[1]}: {err}") from None
    return 0


def _run_spec_twice(args: argparse.Namespace):
    from attn_harness.core.store import read_dataset
    from attn_harness.sampling.spec_env import extract_in_env, parse_env

    if args.files:
        raise HarnessError("give either two extraction files or --spec, not both")
    if not args.name:
        raise HarnessError("--spec needs --name: the spec to run")
    base_env, env = parse_env(args.base_env), parse_env(args.env)
    if not env and not base_env:
        raise HarnessError("--spec needs --env KEY=VALUE (and/or --base-env): the two environments would be the same")
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        a = read_dataset(extract_in_env(args.spec, args.name, folder / "base.nc", base_env)).load()
        b = read_dataset(extract_in_env(args.spec, args.name, folder / "env.nc", env)).load()
    labels = tuple(" ".join(f"{k}={v}" for k, v in e.items()) or "current environment" for e in (base_env, env))
    return a, b, labels
