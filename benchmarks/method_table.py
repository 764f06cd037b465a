"""Every method on one benchmark, several seeds, one table (no Ray, no MLflow).

    python benchmarks/method_table.py --dataset mnist5k [--seeds 0 1 2] [--methods smope hide ...]
        [--set norga:compat_reference_gather=true] [--json FILE]

Runs each method's preset for the dataset through the shared engine (the dataset's default backbone)
and prints mean ± sample std over seeds of FA, CA, FM and task-identity accuracy, with the cost columns.
The rows come in the order given; the default is every registered method, bounds included.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from report_table import argument_errors, check_arguments, print_table, write_json

from promptcl.config import parse_overrides
from promptcl.engine import RunSpec, resolve_run, run_sequence
from promptcl.methods import method_names

HEADER = ["method", "settings", "FA", "CA", "FM", "task-id acc", "trainable", "test MFLOPs/img", "passes", "s/run"]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    p.add_argument("--set", dest="variants", action="append", default=[], metavar="METHOD:KEY=VALUE",
                   help="also run METHOD with this override (a row of its own)")
    p.add_argument("--json", type=Path, default=None, help="write the rows (every seed's figures) here")
    args = p.parse_args(argv)
    with argument_errors(p):  # every run is validated before the first one trains
        check_arguments(methods=args.methods, seeds=args.seeds, json_path=args.json)
        rows = [(m, {}) for m in (args.methods or method_names())]
        for variant in args.variants:
            method, colon, pair = variant.partition(":")
            if not colon:
                raise ValueError(f"--set {variant!r} is not METHOD:KEY=VALUE")
            rows.append((method, parse_overrides([pair])))
        planned = [[resolve_run(RunSpec(method=m, dataset=args.dataset, seed=s, overrides=o)) for s in args.seeds]
                   for m, o in rows]
    table, report = [], {"dataset": args.dataset, "seeds": args.seeds, "rows": []}
    for (method, overrides), runs in zip(rows, planned):
        results = []
        for run in runs:
            with tempfile.TemporaryDirectory() as out:
                results.append({"seed": run.spec.seed, **run_sequence(run, out)})

        def stat(key):
            values = [r[key] for r in results if key in r]
            return f"{np.mean(values):.2f} ± {np.std(values, ddof=1 if len(values) > 1 else 0):.2f}" if values else "-"

        r0 = results[0]
        settings = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "preset"
        table.append([method, settings, stat("final_average_accuracy"), stat("cumulative_average_accuracy"),
                      stat("forgetting"), stat("task_identity_accuracy"), f"{r0['trainable_params']:,}",
                      f"{r0['test_flops_per_image'] / 1e6:.2f}", str(r0["test_passes"]),
                      f"{np.mean([r['wall_seconds'] for r in results]):.0f}"])
        print(" | ".join(table[-1]), flush=True)
        report["rows"].append({"method": method, "overrides": overrides, "backbone": runs[0].backbone, "runs": [
            {k: r.get(k) for k in ("seed", "final_average_accuracy", "cumulative_average_accuracy", "forgetting",
                                   "task_identity_accuracy", "trainable_params", "test_flops_per_image",
                                   "wall_seconds")} for r in results]})
    print()
    print_table(HEADER, table)
    return write_json(report, args.json)


if __name__ == "__main__":
    main()
