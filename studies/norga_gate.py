"""NoRGa gate study: what do the non-linear residual gate's settings buy over HiDe's linear gate?

Ray Tune + Optuna (TPE, define-by-run) over the method itself (HiDe-Prompt = linear gate, or
NoRGa) and, for NoRGa, the gate activation, the initial alpha and tau, and whether alpha/tau stay
learnable after the first task. Each trial runs the whole two-stage pipeline (in its Tune trial
for one CPU worker, through Ray Train for several workers or GPUs) and is logged to MLflow.
"""

from __future__ import annotations

import sys

from promptcl.study.tuner import run_study_script, spec_from_args, study_parser


def search_space(trial) -> None:
    if trial.suggest_categorical("method", ["hide", "norga"]) == "norga":
        trial.suggest_categorical("gate_activation", ["tanh", "sigmoid", "gelu"])
        trial.suggest_float("alpha_init", 0.1, 3.0, log=True)
        trial.suggest_float("tau_init", 0.1, 3.0, log=True)
        trial.suggest_categorical("gate_learnable_after_first_task", [False, True])


# Evaluated first: HiDe-Prompt (the linear gate) and NoRGa with the reference's gate settings.
BASELINES = (
    {"method": "hide"},
    {"method": "norga", "gate_activation": "sigmoid", "alpha_init": 1.0, "tau_init": 1.0,
     "gate_learnable_after_first_task": False},
)


def main(argv=None) -> int:
    args = study_parser(__doc__, name="norga_gate", num_samples=12).parse_args(argv)
    spec = spec_from_args(args, method="norga", search_space=search_space,
                          smoke_overrides={"epochs": 2, "tii_epochs": 3, "tap_epochs": 3},
                          baseline_points=BASELINES)
    return run_study_script(spec, table_params=["method", "gate_activation", "alpha_init", "tau_init",
                                                "gate_learnable_after_first_task"],
                            best_by="method", prog="norga_gate")


if __name__ == "__main__":
    sys.exit(main())
