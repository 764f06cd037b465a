"""SMoPE sweep: how much accuracy do top-k, the expert count and the adaptive noise buy?

Ray Tune + Optuna (TPE) over top-k, experts per head, noise scale and the two loss weights; each
trial runs a whole CL sequence (in its Tune trial for one CPU worker, through Ray Train for several
workers or GPUs: --trial-runner) and is logged to MLflow. Laptop:
``python studies/smope_topk.py``; cluster: ``ray job submit -- python studies/smope_topk.py``.
"""

from __future__ import annotations

import sys

from promptcl.study.tuner import run_study_script, spec_from_args, study_parser


def search_space(trial) -> None:
    # Every top-k choice fits every expert count, so TPE never proposes an invalid pair.
    trial.suggest_categorical("num_experts", [4, 8, 12])
    trial.suggest_int("top_k", 1, 4)
    trial.suggest_float("noise_scale", 0.0, 0.8)
    trial.suggest_float("router_weight", 1e-5, 1e-2, log=True)
    trial.suggest_float("proto_weight", 1e-5, 1e-2, log=True)


def main(argv=None) -> int:
    args = study_parser(__doc__, name="smope_topk", num_samples=12).parse_args(argv)
    spec = spec_from_args(args, method="smope", search_space=search_space,
                          smoke_overrides={"epochs": 2, "ca_epochs": 5})
    return run_study_script(spec, table_params=["top_k", "num_experts", "noise_scale"], best_by="top_k",
                            prog="smope_topk")


if __name__ == "__main__":
    sys.exit(main())
