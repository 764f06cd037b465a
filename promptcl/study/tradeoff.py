"""The efficiency trade-off map: accuracy against trainable parameters and test FLOPs.

Pure functions over trial rows (dicts), plus a loader that reads the finished child runs of an
MLflow experiment. ``dashboards/tradeoff.py`` is the thin script around them.
"""

from __future__ import annotations

from typing import Any, Sequence

from promptcl.study.objectives import Objective, pareto_mask

COST_KEYS = ("trainable_params", "test_flops_per_image")
ACCURACY_KEY = "final_average_accuracy"


def pareto_front(rows: Sequence[dict[str, Any]], cost_keys: Sequence[str] = COST_KEYS,
                 accuracy_key: str = ACCURACY_KEY) -> list[bool]:
    """For each row: True if no other row is at least as accurate and at most as costly on
    every cost, and strictly better on one of them."""
    objectives = [Objective(accuracy_key, "max"), *(Objective(k, "min") for k in cost_keys)]
    return pareto_mask(rows, objectives)


def load_trials(tracking_uri: str, experiment: str) -> list[dict[str, Any]]:
    """One row per finished child run: its method config and final metrics."""
    from promptcl.study.tracking import PARENT_TAG, client

    c = client(tracking_uri)
    found = c.get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(f"no MLflow experiment {experiment!r} at {tracking_uri}")
    rows = []
    for run in c.search_runs([found.experiment_id], filter_string="attributes.status = 'FINISHED'"):
        if PARENT_TAG not in run.data.tags or ACCURACY_KEY not in run.data.metrics:
            continue
        params = {k.split("/", 1)[1]: v for k, v in run.data.params.items() if k.startswith("method_config/")}
        rows.append({"run_id": run.info.run_id, "method": run.data.tags.get("method", ""), **params,
                     **run.data.metrics})
    return rows
