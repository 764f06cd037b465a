"""SMoPE sweep: how much accuracy do top-k, the expert count and the adaptive noise buy?

Ray Tune + Optuna (TPE) over top-k, experts per head, noise scale and the two loss weights; each
trial runs a whole CL sequence through Ray Train and is logged to MLflow. Laptop:
``python studies/smope_topk.py``; cluster: ``ray job submit -- python studies/smope_topk.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from promptcl.study import StudySpec, best_per, format_table, run_study, validate_study


def search_space(trial) -> None:
    # Every top-k choice fits every expert count, so TPE never proposes an invalid pair.
    trial.suggest_categorical("num_experts", [4, 8, 12])
    trial.suggest_int("top_k", 1, 4)
    trial.suggest_float("noise_scale", 0.0, 0.8)
    trial.suggest_float("router_weight", 1e-5, 1e-2, log=True)
    trial.suggest_float("proto_weight", 1e-5, 1e-2, log=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--num-samples", type=int, default=12)
    p.add_argument("--max-concurrent", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="CL run seed (class order, init)")
    p.add_argument("--search-seed", type=int, default=0)
    p.add_argument("--runs-dir", type=Path, default=Path(os.environ.get("PROMPTCL_RUNS_DIR", "runs")))
    p.add_argument("--mlflow-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite in --runs-dir")
    p.add_argument("--storage-path", default=None, help="Ray results; shared storage on a cluster")
    p.add_argument("--progress", action="store_true", help="per-epoch progress bars in worker logs")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per trial's Train worker")
    p.add_argument("--asha", action="store_true", help="stop weak trials early at task boundaries")
    p.add_argument("--name", default="smope_topk")
    p.add_argument("--smoke", action="store_true", help="2 short trials (about a minute on 2 cores)")
    args = p.parse_args(argv)

    fixed = {"epochs": 2, "ca_epochs": 5} if args.smoke else {}
    spec = StudySpec(
        name=args.name + ("_smoke" if args.smoke else ""), method="smope", dataset=args.dataset,
        search_space=search_space, num_samples=2 if args.smoke else args.num_samples,
        max_concurrent=args.max_concurrent, seed=args.seed, search_seed=args.search_seed,
        fixed_overrides=fixed, runs_dir=args.runs_dir, tracking_uri=args.mlflow_uri,
        storage_path=args.storage_path, use_gpu=args.use_gpu, progress=args.progress,
        scheduler="asha" if args.asha else "fifo",
    )
    try:
        validate_study(spec)
    except ValueError as err:
        print(f"smope_topk: error: {err}", file=sys.stderr)
        return 2
    rows = run_study(spec)
    params = ["top_k", "num_experts", "noise_scale"]
    ranked = sorted(rows, key=lambda r: -r["final_average_accuracy"])
    print("\nBest trials:\n" + format_table(ranked[:5], params))
    print("\nBest trial per top-k (accuracy vs parameters and test FLOPs):\n"
          + format_table(best_per(rows, "top_k"), params))
    print(f"\nMLflow: {spec.resolved_tracking_uri()} (experiment {spec.name!r})")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
