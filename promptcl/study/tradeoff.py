"""The efficiency trade-off map: accuracy against trainable parameters and test FLOPs.

Pure functions over trial rows (dicts), plus a loader that reads the finished trials of one study
run of an MLflow experiment. ``dashboards/tradeoff.py`` is the thin script around them.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from promptcl.study.objectives import Objective, pareto_mask

COST_KEYS = ("trainable_params", "test_flops_per_image")
ACCURACY_KEY = "final_average_accuracy"


def pareto_front(rows: Sequence[dict[str, Any]], cost_keys: Sequence[str] = COST_KEYS,
                 accuracy_key: str = ACCURACY_KEY) -> list[bool]:
    """For each row: True if no other row is at least as accurate and at most as costly on
    every cost, and strictly better on one of them."""
    objectives = [Objective(accuracy_key, "max"), *(Objective(k, "min") for k in cost_keys)]
    return pareto_mask(rows, objectives)


def study_front(rows: Sequence[dict[str, Any]]) -> tuple[list[bool], str]:
    """(for each row whether it is on the front, the front's label): the front the study searched for
    (its trials' ``pareto`` tags, on its objectives, e.g. held-out FA) when every trial has one, else
    the front of test FA, trainable parameters and test FLOPs."""
    if rows and all(row.get("pareto") in ("true", "false") for row in rows):
        return [row["pareto"] == "true" for row in rows], "Pareto front of the study's objectives"
    return pareto_front(rows), "Pareto front (FA, params, test FLOPs)"


def load_trials(tracking_uri: str, experiment: str, parent_run_id: Optional[str] = None) -> list[dict[str, Any]]:
    """One row per finished trial of one study run (``parent_run_id``, by default the experiment's
    latest): its method config, final metrics and ``pareto`` tag."""
    from promptcl.study.tracking import finished_trials

    rows = []
    for run in finished_trials(tracking_uri, experiment, parent_run_id)[1]:
        params = {k.split("/", 1)[1]: v for k, v in run.data.params.items() if k.startswith("method_config/")}
        rows.append({"run_id": run.info.run_id, "method": run.data.tags.get("method", ""), **params,
                     **run.data.metrics, "pareto": run.data.tags.get("pareto", "")})
    return rows
