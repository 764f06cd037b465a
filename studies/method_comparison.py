"""Method comparison: every registered method (or a chosen list) x seeds on one benchmark.

A Ray Tune grid over method and seed; each trial runs a whole CL sequence (in its Tune trial for
one CPU worker, through Ray Train for several workers or GPUs) with the method's preset for the
benchmark and is logged to MLflow (a parent run per study, a child per trial, with its cost).
Printed and saved at the end: FA / CA / FM as mean ± std over the seeds with trainable parameters
and test FLOPs per image, one row per method (the shape of the seeds' Table 1): ``methods.md`` and
``methods.parquet`` under the runs directory, and as artifacts of the parent run. The runs also
feed the trade-off map (``dashboards/tradeoff.py``).
Laptop: ``python studies/method_comparison.py``; cluster: ``ray job submit -- python
studies/method_comparison.py --methods smope,hide,coda --seeds 5 --use-gpu ...``.
"""

from __future__ import annotations

import dataclasses
import sys

from promptcl.methods import get_method, method_names
from promptcl.study import tracking
from promptcl.study.objectives import ACCURACY_AND_COST
from promptcl.study.comparison import format_method_table, method_table, write_method_table
from promptcl.study.tuner import (StudyInterrupted, print_study_paths, run_study, spec_from_args, stored_parent_run,
                                  study_parser, validate_study)
from promptcl.study.trainer import fault_from_env

# --smoke: the short version of every schedule, applied to each method that has the setting.
SMOKE = {"epochs": 1, "vor_epochs": 1, "ca_epochs": 2, "tap_epochs": 2, "tii_epochs": 2, "tii_ca_epochs": 2}


def smoke_overrides(methods: list[str]) -> dict[str, dict]:
    """Per method, the SMOKE settings its config has (e.g. only OVOR has vor_epochs)."""
    out = {}
    for method in methods:
        fields = {f.name for f in dataclasses.fields(get_method(method).Config)}
        out[method] = {k: v for k, v in SMOKE.items() if k in fields}
    return out


def main(argv=None) -> int:
    # a grid of fixed configurations selects nothing: every training image trains
    parser = study_parser(__doc__, name="method_comparison", num_samples=1, objectives=ACCURACY_AND_COST,
                          validation_fraction=0.0)
    parser.add_argument("--methods", default=None, help="comma-separated (default: every registered method)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 per method (default 3; 1 with --smoke)")
    parser.set_defaults(seed=None, search_seed=None)  # to tell a given flag from the default
    args = parser.parse_args(argv)
    prog = "method_comparison"
    try:
        # A grid has no search: the trials are methods x --seeds.
        ignored = [flag for flag, value in (("--num-samples", args.num_samples), ("--seed", args.seed),
                                            ("--search-seed", args.search_seed)) if value is not None]
        if ignored:
            raise ValueError(f"{', '.join(ignored)} do not apply to a method x seed grid (use --seeds N "
                             "for seeds 0..N-1)")
        args.seed = args.search_seed = 0
        methods = [m.strip() for m in args.methods.split(",")] if args.methods is not None else method_names()
        if not all(methods):
            raise ValueError(f"--methods {args.methods!r} has an empty name (a comma-separated list of methods)")
        for method in methods:
            get_method(method)
        repeated = sorted({m for m in methods if methods.count(m) > 1})
        if repeated:
            raise ValueError(f"--methods names {', '.join(repeated)} more than once (a grid runs each method once "
                             "per seed)")
        num_seeds = args.seeds if args.seeds is not None else (1 if args.smoke else 3)
        if num_seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {num_seeds}")
        seeds = tuple(range(num_seeds))
        spec = dataclasses.replace(
            spec_from_args(args, method=methods[0], search_space=None, smoke_overrides={}),
            grid={"method": tuple(methods), "seed": seeds},
            per_method_overrides=smoke_overrides(methods) if args.smoke else {})
        validated = validate_study(spec)
        fault_from_env()
    except (ValueError, ImportError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    try:
        rows = run_study(spec, validated=validated)
    except StudyInterrupted as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 130
    table = method_table(rows)
    paths = write_method_table(table, args.runs_dir / spec.name)
    parent = stored_parent_run(spec)
    if parent is not None:
        for path in paths:
            tracking.client(spec.resolved_tracking_uri()).log_artifact(parent, str(path))
    print(f"\n{spec.dataset}: {len(rows)} runs, seeds {list(seeds)}\n" + format_method_table(table))
    print(f"\nTable:  {paths[1].resolve()}")
    print_study_paths(spec, report=spec.report and bool(rows))
    return 0 if len(rows) == len(methods) * len(seeds) else 1


if __name__ == "__main__":
    sys.exit(main())
