"""MLflow tracking: one parent run per study, one child run per trial, per-task metrics.

All calls go through ``MlflowClient`` with an explicit tracking URI, so nothing depends on
process-global MLflow state (Ray workers and the driver log to the same store).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any, Optional

import numpy as np

from promptcl.storage import check_database_url, make_sqlite_parent, sqlite_file, without_password

PARENT_TAG = "mlflow.parentRunId"
# A run's identity across restarts (a trial id): a restarted worker or a resumed study attaches
# to the run that carries it instead of making a duplicate.
RUN_KEY_TAG = "promptcl.run_key"
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def default_runs_dir() -> Path:
    """Where studies and the commands that read them keep their stores unless told: $PROMPTCL_RUNS_DIR,
    else ``runs`` in the current directory."""
    return Path(os.environ.get("PROMPTCL_RUNS_DIR") or "runs")


def default_tracking_uri(runs_dir: Path) -> str:
    return f"sqlite:///{Path(runs_dir).resolve() / 'mlflow.db'}"


def tracking_uri(given: Optional[str], runs_dir: Optional[Path] = None) -> str:
    """The MLflow store a command uses: the one given, else $MLFLOW_TRACKING_URI, else the sqlite
    store under ``runs_dir`` (default :func:`default_runs_dir`; every study, report and dashboard
    resolves it the same way); a relative SQLite file is taken from the current directory and made
    absolute."""
    uri = given or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(runs_dir or default_runs_dir())
    try:
        database = sqlite_file(uri)
    except ValueError:  # a malformed URL: check_tracking_uri says so
        return uri
    if database is not None and not database.is_absolute():  # trials and workers run in other directories
        from sqlalchemy.engine import make_url

        uri = make_url(uri).set(database=str(database.resolve())).render_as_string(hide_password=False)
    return uri


def check_tracking_uri(uri: str) -> None:
    """A tracking URI MLflow has a store for (sqlite, http(s), a database URL, ...); the store itself
    is not opened (a sqlite file would be created), but a tracking server must accept a connection
    (else MLflow retries for minutes, then fails with a traceback). A plain path or file: URI is
    MLflow's file store, which MLflow 3 refuses unless MLFLOW_ALLOW_FILE_STORE is set."""
    from mlflow.exceptions import MlflowException
    from mlflow.store.db.db_types import DATABASE_ENGINES
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry
    from mlflow.utils.uri import is_databricks_uri

    try:
        _tracking_store_registry.get_store_builder(uri)
    except MlflowException:
        raise ValueError(f"MLflow tracking URI {uri!r} names no tracking store (use sqlite:///…, "
                         "http(s)://… or a database URL)") from None
    allowed = os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("1", "true", "yes")
    if _scheme(uri) in ("", "file") and not is_databricks_uri(uri) and not allowed:
        raise ValueError(f"MLflow tracking URI {uri!r} is a file store, which MLflow refuses unless "
                         "MLFLOW_ALLOW_FILE_STORE=true; use sqlite:///…/mlflow.db")
    if _scheme(uri) in DATABASE_ENGINES:  # MLflow's SQLAlchemy store
        check_database_url("MLflow tracking URI", uri)
    if _scheme(uri) in ("http", "https"):
        _check_server_reachable(uri)


def _check_server_reachable(uri: str, timeout: float = 10.0) -> None:
    import socket

    parts = urllib.parse.urlsplit(uri)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except (OSError, ValueError) as err:
        raise ValueError(f"MLflow tracking URI {without_password(uri)!r}: the server cannot be reached "
                         f"({getattr(err, 'strerror', None) or err}); start it, or give another --mlflow-uri") from None


def client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def holds_run(tracking_uri: str, run_id: str) -> bool:
    """Whether the store holds run ``run_id``; a sqlite file that is not there is not created."""
    from mlflow.exceptions import MlflowException

    database = sqlite_file(tracking_uri)
    if database is not None and not database.is_file():
        return False
    try:
        client(tracking_uri).get_run(run_id)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        detail = " ".join(str(err).split())[:200]
        raise ValueError(f"MLflow tracking URI {without_password(tracking_uri)!r} cannot be read ({detail})") from None
    return True


def ensure_experiment(tracking_uri: str, name: str, artifact_dir: Optional[Path] = None) -> str:
    """Experiment id, creating it (in the driver, before trials race to) if needed."""
    make_sqlite_parent(tracking_uri)
    c = client(tracking_uri)
    found = c.get_experiment_by_name(name)
    if found is not None:
        experiment_id = found.experiment_id
    else:
        location = None
        if artifact_dir is not None and tracking_uri.startswith("sqlite:"):
            location = Path(artifact_dir).resolve().as_uri()
        experiment_id = c.create_experiment(name, artifact_location=location)
    # A model-training experiment: the MLflow UI opens it on its runs, not on GenAI traces.
    c.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment_id


def start_run(tracking_uri: str, experiment_id: str, name: str, *, parent_run_id: Optional[str] = None,
              tags: Optional[dict[str, str]] = None) -> str:
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    return client(tracking_uri).create_run(experiment_id, run_name=name, tags=all_tags).info.run_id


def find_run(tracking_uri: str, experiment_id: str, key: str) -> Optional[str]:
    """The (non-deleted) run tagged with ``key``, if any."""
    found = client(tracking_uri).search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'",
                                             max_results=2)
    if len(found) > 1:
        raise RuntimeError(f"two MLflow runs carry the run key {key!r}")
    return found[0].info.run_id if found else None


def find_or_start_run(tracking_uri: str, experiment_id: str, name: str, *, key: str,
                      parent_run_id: Optional[str] = None, tags: Optional[dict[str, str]] = None) -> tuple[str, bool]:
    """(run id, created): the run tagged ``key``, set RUNNING again, or a new one."""
    run_id = find_run(tracking_uri, experiment_id, key)
    if run_id is not None:
        client(tracking_uri).update_run(run_id, status="RUNNING")
        return run_id, False
    return start_run(tracking_uri, experiment_id, name, parent_run_id=parent_run_id,
                     tags={**(tags or {}), RUN_KEY_TAG: key}), True


def search_all_runs(tracking_uri: str, experiment_id: str, filter_string: str = "",
                    order_by: Optional[list[str]] = None, page_size: int = 1000) -> list:
    """Every run that matches, page by page (one MLflow search returns at most 1,000)."""
    c = client(tracking_uri)
    runs, token = [], None
    while True:
        page = c.search_runs([experiment_id], filter_string=filter_string, order_by=order_by, max_results=page_size,
                             page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def children(tracking_uri: str, experiment_id: str, parent_run_id: str, filter_string: str = "") -> list:
    """The child runs (trials) of one study run, optionally narrowed by ``filter_string``."""
    own = f"tags.`{PARENT_TAG}` = '{parent_run_id}'"
    return search_all_runs(tracking_uri, experiment_id, f"{own} and {filter_string}" if filter_string else own)


def study_run(tracking_uri: str, experiment: str, parent_run_id: Optional[str] = None) -> tuple[str, str]:
    """(experiment id, study run id) of ``experiment``: ``parent_run_id``, checked to be one of its
    study (parent) runs, or by default its latest. A study run that is run again (``--resume``)
    keeps its id; a fresh run of the same study name starts a new one beside the old."""
    from mlflow.exceptions import MlflowException

    store = sqlite_file(tracking_uri)
    if store is not None and not store.is_file():
        raise ValueError(f"no MLflow store at {tracking_uri}")  # (opening it would create an empty one)
    check_tracking_uri(tracking_uri)
    c = client(tracking_uri)
    try:
        found = c.get_experiment_by_name(experiment)
        if found is None:
            raise ValueError(f"no MLflow experiment {experiment!r} at {tracking_uri}")
        if parent_run_id is None:
            latest = _latest_parent_run(c, found.experiment_id)
            if latest is None:
                raise ValueError(f"MLflow experiment {experiment!r} has no study run")
            return found.experiment_id, latest
        try:
            run = c.get_run(parent_run_id)
        except MlflowException:
            run = None
    except MlflowException as err:  # an unreachable server, a refused query
        raise ValueError(f"MLflow at {tracking_uri}: {' '.join(str(err).split())}") from None
    if run is None or run.info.experiment_id != found.experiment_id or PARENT_TAG in run.data.tags:
        raise ValueError(f"{parent_run_id!r} is not a study run of MLflow experiment {experiment!r}")
    return found.experiment_id, parent_run_id


def finished_trials(tracking_uri: str, experiment: str, parent_run_id: Optional[str] = None) -> tuple[str, list]:
    """(study run id, its finished trials that logged a final accuracy) of one study run of
    ``experiment`` (``parent_run_id``, by default the latest; see ``study_run``)."""
    experiment_id, parent_run_id = study_run(tracking_uri, experiment, parent_run_id)
    runs = children(tracking_uri, experiment_id, parent_run_id, "attributes.status = 'FINISHED'")
    return parent_run_id, [run for run in runs if "final_average_accuracy" in run.data.metrics]


def _latest_parent_run(c, experiment_id: str) -> Optional[str]:
    """The newest run without a parent, page by page (tag-absence filters are not in every MLflow
    server's search syntax, so the parent tag is checked here)."""
    token = None
    while True:
        page = c.search_runs([experiment_id], order_by=["attributes.start_time DESC"], max_results=1000,
                             page_token=token)
        parent = next((r.info.run_id for r in page if PARENT_TAG not in r.data.tags), None)
        if parent is not None or not page.token:
            return parent
        token = page.token


def _scheme(uri: str) -> str:
    return urllib.parse.urlsplit(uri).scheme.split("+")[0] if "://" in uri or uri.startswith("sqlite:") else ""


def logged_steps(tracking_uri: str, run_id: str, metric: str) -> set[int]:
    return {m.step for m in client(tracking_uri).get_metric_history(run_id, metric)}


def log_params(tracking_uri: str, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    c = client(tracking_uri)
    items = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i:i + 100])


def log_metrics(tracking_uri: str, run_id: str, values: dict[str, float], step: int = 0) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, step) for k, v in values.items()]
    if metrics:
        client(tracking_uri).log_batch(run_id, metrics=metrics)


def log_task(tracking_uri: str, run_id: str, task: int, accuracy: np.ndarray) -> None:
    """Per-task metrics with step = task: accuracy on each seen task and their average. Once per
    step: a worker restarted from an earlier checkpoint does not log a task twice."""
    if task in logged_steps(tracking_uri, run_id, "average_accuracy"):
        return
    row = accuracy[task, : task + 1]
    values = {f"acc/task_{i}": float(a) for i, a in enumerate(row)}
    values["average_accuracy"] = float(row.mean())
    log_metrics(tracking_uri, run_id, values, step=task)


def log_run_outputs(tracking_uri: str, run_id: str, summary: dict[str, Any], out_dir: Path) -> None:
    """Final metrics, the accuracy matrix and resolved config as artifacts."""
    c = client(tracking_uri)
    from promptcl.engine import FINAL_METRICS

    final = {k: summary[k] for k in (*FINAL_METRICS, "task_identity_accuracy") if k in summary}
    if "final_average_accuracy" not in c.get_run(run_id).data.metrics:  # once, across restarts
        log_metrics(tracking_uri, run_id, final, step=len(summary["accuracy_matrix"]) - 1)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "accuracy_matrix.json").write_text(json.dumps(summary["accuracy_matrix"]))
        (Path(tmp) / "config.json").write_text(json.dumps(summary["config"], indent=2))
        c.log_artifacts(run_id, tmp)
    for name in ("results.parquet", "summary.json"):
        if (Path(out_dir) / name).is_file():
            c.log_artifact(run_id, str(Path(out_dir) / name))


def finish(tracking_uri: str, run_id: str, status: str = "FINISHED", tags: Optional[dict[str, str]] = None) -> None:
    c = client(tracking_uri)
    for key, value in (tags or {}).items():
        c.set_tag(run_id, key, value)
    c.set_terminated(run_id, status=status)
