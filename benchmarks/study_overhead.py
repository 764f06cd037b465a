"""A study's wall time against its ideal, per trial runner: how much of a study is Ray's fixed cost.

    python benchmarks/study_overhead.py [--num-samples 12] [--max-concurrent 2] [--smoke] [--dataset digits]
                                        [--runners train inline] [--json runs/benchmarks/study_overhead.json]

Runs the default study's search (``studies/smope_topk.py``, search seed 0; on ``digits`` unless told
otherwise, whose short trials show a trial's fixed cost at its largest) once per trial runner, in
this one process on one local Ray instance started beforehand (so neither pays Ray's start-up),
and prints for each: the study's wall time, the CL compute of its trials (each run's own
``wall_seconds``: data, backbone, training, evaluation), the ideal wall time (that compute ÷ the
concurrency the trials can use, and at least the longest trial), their ratio, and the fixed cost per
trial ((wall − ideal) × concurrency ÷ trials).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from report_table import argument_errors, check_arguments, print_table, write_json

ROOT = Path(__file__).resolve().parents[1]


def measure(runner: str, args) -> dict:
    sys.path.insert(0, str(ROOT / "studies"))
    import smope_topk

    from promptcl.study.tuner import run_study, spec_from_args, study_parser

    with tempfile.TemporaryDirectory() as runs:
        # its own MLflow store too: never the user's $MLFLOW_TRACKING_URI
        flags = ["--runs-dir", runs, "--mlflow-uri", f"sqlite:///{runs}/mlflow.db", "--dataset", args.dataset,
                 "--num-samples", str(args.num_samples), "--max-concurrent", str(args.max_concurrent),
                 "--trial-runner", runner, "--no-report", "--name", f"overhead_{runner}",
                 *(["--smoke"] if args.smoke else [])]
        parsed = study_parser("", name="overhead", num_samples=args.num_samples).parse_args(flags)
        spec = spec_from_args(parsed, method="smope", search_space=smope_topk.search_space,
                              smoke_overrides={"epochs": 2, "ca_epochs": 5})
        start = time.perf_counter()
        rows = run_study(spec)
        wall = time.perf_counter() - start
    trial_seconds = [r["wall_seconds"] for r in rows]
    return {"runner": runner, "wall_s": wall, **ideal_schedule(trial_seconds, args.max_concurrent, wall)}


def ideal_schedule(trial_seconds: list[float], max_concurrent: int, wall: float) -> dict:
    """The ideal wall time of trials that take ``trial_seconds`` of compute, at most ``max_concurrent``
    at a time: their compute over the concurrency they can use (no more than there are trials), and
    never below the longest trial; and the fixed cost per trial that the measured ``wall`` implies."""
    concurrency = max(1, min(max_concurrent, len(trial_seconds)))
    compute = sum(trial_seconds)
    ideal = max(compute / concurrency, max(trial_seconds, default=0.0))
    fixed_per_trial = (wall - ideal) * concurrency / max(1, len(trial_seconds))
    return {"trials": len(trial_seconds), "concurrency": concurrency, "trial_compute_s": compute, "ideal_s": ideal,
            "wall_over_ideal": wall / ideal, "fixed_cost_per_trial_s": fixed_per_trial}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-samples", type=int, default=12)
    p.add_argument("--max-concurrent", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="the studies' short trials")
    p.add_argument("--dataset", default="digits", help="the study's benchmark (default: digits, the shortest trials)")
    p.add_argument("--runners", nargs="+", choices=("train", "inline"), default=["train", "inline"])
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    with argument_errors(p):
        check_arguments(at_least_one={"--num-samples": args.num_samples, "--max-concurrent": args.max_concurrent},
                        json_path=args.json)

    from promptcl.study.tuner import ensure_ray

    start = time.perf_counter()
    ensure_ray()
    ray_start = time.perf_counter() - start
    rows = [measure(runner, args) for runner in args.runners]
    report = {"dataset": args.dataset, "num_samples": args.num_samples, "max_concurrent": args.max_concurrent,
              "smoke": args.smoke,
              "ray_start_s": ray_start, "rows": rows}
    print(f"{args.num_samples} trials on {args.dataset}, {args.max_concurrent} at a time"
          f"{', smoke' if args.smoke else ''}; "
          f"Ray start-up {ray_start:.1f} s (not counted)")
    print_table(["runner", "trials", "wall s", "trial compute s", "ideal s", "wall ÷ ideal", "fixed cost per trial s"],
                [[r["runner"], str(r["trials"]), f"{r['wall_s']:.1f}", f"{r['trial_compute_s']:.1f}",
                  f"{r['ideal_s']:.1f}", f"{r['wall_over_ideal']:.2f}x", f"{r['fixed_cost_per_trial_s']:.1f}"]
                 for r in rows])
    return write_json(report, args.json)


if __name__ == "__main__":
    main()
