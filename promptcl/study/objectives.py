"""What a study optimises: one or more ``metric:direction`` objectives, and their Pareto front.

The cost metrics are known before training (:func:`promptcl.cost.measure_cost` needs none), so
every result Ray Tune sees carries them; the accuracy metrics and the training FLOPs per run arrive
with a trial's final result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Sequence

# Final metrics a study can optimise (all in a trial's final result and its MLflow child run).
ACCURACY_METRICS = ("final_average_accuracy", "cumulative_average_accuracy", "forgetting", "forgetting_canonical",
                    "backward_transfer", "task_identity_accuracy",
                    # on the held-out training images of a run with a validation split
                    "validation_final_average_accuracy", "validation_cumulative_average_accuracy")
COST_METRICS = ("trainable_params", "train_flops_per_image", "test_flops_per_image")
# costs a run knows only at its end (the training work the engine counted), like the accuracies
RUN_COST_METRICS = ("train_flops_per_run",)
OBJECTIVE_METRICS = ACCURACY_METRICS + COST_METRICS + RUN_COST_METRICS


@dataclass(frozen=True)
class Objective:
    metric: str
    mode: Literal["max", "min"]

    def __str__(self) -> str:
        return f"{self.metric}:{self.mode}"


ACCURACY = (Objective("final_average_accuracy", "max"),)
ACCURACY_AND_COST = (Objective("final_average_accuracy", "max"), Objective("trainable_params", "min"),
                     Objective("test_flops_per_image", "min"))


def read_on_held_out(objectives: tuple[Objective, ...]) -> tuple[Objective, ...]:
    """``objectives`` with FA read on the held-out training images of a run's validation split."""
    return tuple(Objective(f"validation_{o.metric}", o.mode) if o.metric == "final_average_accuracy" else o
                 for o in objectives)


def on_validation(objectives: tuple[Objective, ...]) -> tuple[Objective, ...]:
    """A study's default objectives for runs with a validation split: FA read on the held-out
    images (the single accuracy objective already is, through ``search_score``)."""
    return objectives if objectives == ACCURACY else read_on_held_out(objectives)


def parse_objectives(text: str) -> tuple[Objective, ...]:
    """``"final_average_accuracy:max,trainable_params:min"`` -> objectives; ValueError on a typo."""
    objectives = []
    for item in (part.strip() for part in text.split(",")):
        metric, sep, mode = item.partition(":")
        if not sep or mode not in ("max", "min"):
            raise ValueError(f"an objective is metric:max or metric:min, got {item!r}")
        if metric not in OBJECTIVE_METRICS:
            raise ValueError(f"unknown objective metric {metric!r}; choose from {', '.join(OBJECTIVE_METRICS)}")
        objectives.append(Objective(metric, mode))
    if len({o.metric for o in objectives}) != len(objectives):
        raise ValueError(f"an objective metric appears twice in {text!r}")
    return tuple(objectives)


def dominates(a: dict[str, Any], b: dict[str, Any], objectives: Sequence[Objective]) -> bool:
    """``a`` is no worse than ``b`` on every objective and strictly better on one."""
    sign = {o.metric: 1.0 if o.mode == "max" else -1.0 for o in objectives}
    gains = [sign[o.metric] * (a[o.metric] - b[o.metric]) for o in objectives]
    return all(g >= 0 for g in gains) and any(g > 0 for g in gains)


def pareto_mask(rows: Sequence[dict[str, Any]], objectives: Sequence[Objective]) -> list[bool]:
    """For each row: True if no other row dominates it (with one objective: the best rows). A row
    with a NaN objective compares with nothing, so it is never on the front and hides no other row."""
    scored = [all(not math.isnan(float(row[o.metric])) for o in objectives) for row in rows]
    candidates = [row for row, ok in zip(rows, scored) if ok]
    return [ok and not any(dominates(other, row, objectives) for other in candidates if other is not row)
            for row, ok in zip(rows, scored)]
