"""Every method on the embedded digits benchmark, several seeds, one table (no Ray, no MLflow).

    python benchmarks/embedded_methods.py [--seeds 0 1 2] [--methods smope hide norga] [--set norga:compat_reference_gather=true]

Runs each method's ``digits`` preset through the shared engine and prints mean ± std over seeds
of FA, CA, FM, task-identity accuracy, and the cost columns.
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np

from promptcl.config import parse_overrides
from promptcl.engine import RunSpec, resolve_run, run_sequence


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=["smope", "hide", "norga"])
    p.add_argument("--set", dest="variants", action="append", default=[], metavar="METHOD:KEY=VALUE",
                   help="also run METHOD with this override (a row of its own)")
    args = p.parse_args(argv)
    rows = [(m, {}) for m in args.methods]
    for variant in args.variants:
        method, _, pair = variant.partition(":")
        rows.append((method, parse_overrides([pair])))
    print("method | settings | FA | CA | FM | task-id acc | trainable | test MFLOPs/img | passes | s/run")
    print(" | ".join(["---"] * 10))
    for method, overrides in rows:
        results = []
        for seed in args.seeds:
            run = resolve_run(RunSpec(method=method, dataset="digits", seed=seed, overrides=overrides))
            with tempfile.TemporaryDirectory() as out:
                results.append(run_sequence(run, out))

        def stat(key):
            values = [r[key] for r in results if key in r]
            return f"{np.mean(values):.2f} ± {np.std(values):.2f}" if values else "-"

        r0 = results[0]
        settings = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "digits preset"
        print(f"{method} | {settings} | {stat('final_average_accuracy')} | {stat('cumulative_average_accuracy')} | "
              f"{stat('forgetting')} | {stat('task_identity_accuracy')} | {r0['trainable_params']:,} | "
              f"{r0['test_flops_per_image'] / 1e6:.2f} | {r0['test_passes']} | "
              f"{np.mean([r['wall_seconds'] for r in results]):.0f}", flush=True)


if __name__ == "__main__":
    main()
