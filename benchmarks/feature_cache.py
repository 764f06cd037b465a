"""A study with and without the shared frozen-feature store: un-prompted passes and wall time.

    python benchmarks/feature_cache.py [--methods hide norga l2p simplecil] [--seeds 0 1]
                                       [--max-concurrent 1] [--json runs/benchmarks/feature_cache.json]

Runs the same grid study (method × seed, each method's digits preset) twice on one local Ray
instance started beforehand: with ``--no-feature-cache`` and with the store (a fresh one), and
prints the images that went through an un-prompted backbone pass, those read from the store, and
the wall times, with their ratios. With one trial at a time every trial after the first of a
backbone finds the images an earlier one passed; concurrent trials share what they have flushed
(after each task).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from report_table import argument_errors, check_arguments, print_table, write_json

from promptcl.study.tuner import StudySpec, ensure_ray, run_study


def measure(methods: list[str], seeds: list[int], max_concurrent: int, cache: bool) -> dict:
    with tempfile.TemporaryDirectory() as runs:
        spec = StudySpec(name=f"feature_cache_{'on' if cache else 'off'}", method=methods[0], dataset="digits",
                         grid={"method": tuple(methods), "seed": tuple(seeds)}, max_concurrent=max_concurrent,
                         runs_dir=Path(runs), feature_cache=cache, report=False,
                         tracking_uri=f"sqlite:///{runs}/mlflow.db")  # never the user's $MLFLOW_TRACKING_URI
        start = time.perf_counter()
        rows = run_study(spec)
        wall = time.perf_counter() - start
    return {"feature_cache": cache, "trials": len(rows), "wall_s": wall,
            "frozen_images_computed": int(sum(r["frozen_images_computed"] for r in rows)),
            "frozen_images_reused": int(sum(r["frozen_images_reused"] for r in rows)),
            "final_average_accuracy": {f"{r['method']}/{r['seed']}": r["final_average_accuracy"] for r in rows}}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["hide", "norga", "l2p", "simplecil"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--max-concurrent", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    with argument_errors(p):
        check_arguments(methods=args.methods, seeds=args.seeds, at_least_one={"--max-concurrent": args.max_concurrent},
                        json_path=args.json)
    ensure_ray()
    off = measure(args.methods, args.seeds, args.max_concurrent, cache=False)
    on = measure(args.methods, args.seeds, args.max_concurrent, cache=True)
    report = {"methods": args.methods, "seeds": args.seeds, "max_concurrent": args.max_concurrent,
              "without": off, "with": on,
              "passes_ratio": on["frozen_images_computed"] / max(1, off["frozen_images_computed"]),
              "wall_ratio": on["wall_s"] / off["wall_s"],
              "same_accuracy": on["final_average_accuracy"] == off["final_average_accuracy"]}
    print(f"digits, methods {' '.join(args.methods)} x seeds {' '.join(map(str, args.seeds))}, "
          f"{args.max_concurrent} at a time")
    rows = [["on" if r["feature_cache"] else "off", str(r["trials"]), f"{r['frozen_images_computed']:,}",
             f"{r['frozen_images_reused']:,}", f"{r['wall_s']:.1f}"] for r in (off, on)]
    print_table(["feature store", "trials", "images through un-prompted passes", "read from the store", "wall s"],
                rows)
    print(f"with ÷ without: un-prompted passes {report['passes_ratio']:.2f}x, wall {report['wall_ratio']:.2f}x; "
          f"same accuracies: {report['same_accuracy']}")
    return write_json(report, args.json)


if __name__ == "__main__":
    main()
