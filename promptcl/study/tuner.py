"""Ray Tune + Optuna studies whose trials each run a whole CL sequence through Ray Train.

Three layers (the Ray Train V2 pattern): :func:`promptcl.study.trainer.train_worker` runs on each of a
trial's Train workers and drives :func:`promptcl.engine.run_sequence`, reporting after every task;
``_trial_driver`` is the Tune trial, which builds and fits a ``TorchTrainer`` named after the
trial; :func:`run_study` builds (or, with ``resume``, restores) the ``Tuner`` with an
``OptunaSearch`` over a define-by-run space. MLflow: a parent run per study (made here, before any
trial starts, and found again on resume), a child run per trial (made or re-attached by the rank-0
worker, keyed by the trial id).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import signal
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

from ray.tune import Callback
from ray.tune.search.optuna import OptunaSearch

from promptcl.config import parse_overrides
from promptcl.core.backbone import LOCAL_BACKBONES
from promptcl.core.feature_store import check_root
from promptcl.core.pretrain import local_checkpoint
from promptcl.data import CLASS_ORDERS
from promptcl.data.preprocessing import PROTOCOLS
from promptcl.engine import FINAL_METRICS, RunSpec, check_local_resources, resolve_run
from promptcl.methods import get_method
from promptcl.storage import (check_database_url, check_writable_location, make_sqlite_parent, sqlite_file,
                              without_password)
from promptcl.study import tracking
from promptcl.study.console import TrialEvents, study_console
from promptcl.study.objectives import (ACCURACY, Objective, on_validation, parse_objectives, pareto_mask,
                                       read_on_held_out)
from promptcl.study.trainer import Scaling, TuneSession, fault_from_env, make_trainer, run_reported

SearchSpace = Callable[[Any], Optional[dict]]  # optuna.Trial -> constants (define-by-run)
DRIVER_REQUEST = 0.01  # what a trial's driver asks for (of CPU, or of --driver-resource) beside its Train workers


@dataclass(frozen=True, kw_only=True)
class StudySpec:
    name: str
    method: str
    dataset: str
    search_space: Optional[SearchSpace] = None  # Optuna's define-by-run space, unless ``grid`` is given
    num_samples: int = 8
    max_concurrent: int = 2
    seed: int = 0
    fixed_overrides: dict[str, Any] = field(default_factory=dict)
    runs_dir: Path = Path("runs")
    tracking_uri: Optional[str] = None  # default: sqlite under runs_dir (or $MLFLOW_TRACKING_URI)
    storage_path: Optional[str] = None  # default: runs_dir/ray_results; use shared storage on clusters
    scaling: Scaling = Scaling()  # Train workers per trial, their resources, restarts
    precision: str = "fp32"
    # what every trial's run takes besides method, seed and hyperparameters (RunSpec fields):
    # backbone, checkpoint_file, data_dir, protocol (a disk benchmark's root must be visible to workers),
    # class_order, compile_backbone
    run_options: dict[str, Any] = field(default_factory=dict)
    search_seed: int = 0
    scheduler: Literal["fifo", "asha"] = "fifo"
    resume: bool = False  # continue the study stored under storage_path/name, if any
    driver_resource: Optional[str] = None  # custom resource the trial drivers request instead of CPU
    progress: bool = False  # per-epoch progress bars in the Train workers' logs
    baseline_points: tuple[dict[str, Any], ...] = ()  # configurations the search evaluates first
    # A full grid instead of a search: key -> values, every combination once (e.g. method x seed;
    # "method" and "seed" set the run itself, other keys are method hyperparameters)
    grid: Optional[dict[str, tuple]] = None
    per_method_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # on top of fixed ones
    objectives: tuple[Objective, ...] = ACCURACY  # what Optuna optimises; several: a Pareto front
    verbose: bool = False  # Ray's tables and worker logs on the console, not only in the study log
    report: bool = True  # study scripts build the HTML report at the end
    # "train": every trial fits a Ray Train TorchTrainer; "inline": the trial runs its one-process CL
    # sequence itself (no worker group to start); "auto": inline for one CPU worker per trial
    trial_runner: Literal["auto", "inline", "train"] = "auto"
    feature_cache: bool = True  # trials share un-prompted backbone features (see resolved_feature_cache)
    optuna_storage: Optional[str] = None  # SQLAlchemy URL of the Optuna study; default sqlite in runs_dir

    def resolved_optuna_storage(self) -> str:
        return self.optuna_storage or f"sqlite:///{(Path(self.runs_dir) / 'optuna.db').resolve()}"

    def selection_metric(self) -> str:
        """The accuracy best trials are picked by: FA on the held-out training images when the runs
        have a validation split (``run_options["validation_fraction"]``), else FA on the test sets."""
        accuracy = read_on_held_out(ACCURACY) if self.run_options.get("validation_fraction") else ACCURACY
        return accuracy[0].metric

    def front_objectives(self) -> tuple[Objective, ...]:
        """What the study's front is tagged on (MLflow ``pareto``, the report's stars): its objectives,
        except that the single accuracy objective, which the searcher reads through ``search_score``,
        reads the held-out images when the runs have them."""
        if self.objectives == ACCURACY and self.run_options.get("validation_fraction"):
            return read_on_held_out(ACCURACY)
        return self.objectives

    def searcher_metric(self) -> tuple[str | list[str], str | list[str]]:
        """(metric, mode) for OptunaSearch. The single accuracy objective goes through
        ``search_score``, which is comparable across task milestones (ASHA-safe)."""
        if self.objectives == ACCURACY:
            return "search_score", "max"
        if len(self.objectives) == 1:
            return self.objectives[0].metric, self.objectives[0].mode
        return [o.metric for o in self.objectives], [o.mode for o in self.objectives]

    def methods(self) -> tuple[str, ...]:
        """Every method the study runs: the grid's, the search space's ``method`` choices, else ``method``."""
        if self.grid is not None:
            return tuple(self.grid.get("method", (self.method,)))
        if self.search_space is not None:
            found = [choice for suggested, _ in space_branches(self.search_space) for kind, name, *args in suggested
                     if (kind, name) == ("categorical", "method") for choice in args[0]]
            if found:
                return tuple(dict.fromkeys(found))
        return (self.method,)

    def overrides_for(self, method: str) -> dict[str, Any]:
        return {**self.fixed_overrides, **self.per_method_overrides.get(method, {})}

    def resolved_tracking_uri(self) -> str:
        return tracking.tracking_uri(self.tracking_uri, self.runs_dir)

    def resolved_storage_path(self) -> str:
        """A URI as given; a local path made absolute (Ray and pyarrow take no relative one)."""
        if self.storage_path is not None and "://" in self.storage_path:
            return self.storage_path
        return str(Path(self.storage_path or Path(self.runs_dir) / "ray_results").resolve())

    def resolved_feature_cache(self) -> Optional[str]:
        """Where the study's trials share un-prompted backbone features (beside Ray's results, so
        on a cluster on the shared storage path), unless ``feature_cache`` is off."""
        return f"{self.resolved_storage_path().rstrip('/')}/feature_cache" if self.feature_cache else None

    def trial_request(self) -> dict[str, float]:
        """What Tune's trial itself asks for: an inline trial is its one worker; otherwise the trial
        is only a driver, whose Train workers hold the CPUs (or GPUs)."""
        if self.inline_trials():
            return self.scaling.resources_per_worker()
        return {self.driver_resource or "CPU": DRIVER_REQUEST}

    def trial_resources(self) -> dict[str, float]:
        """What one trial holds while it runs: its request and, beside a driver, its Train workers."""
        request = self.trial_request()
        if self.inline_trials():
            return request
        workers = self.scaling.group_resources()
        return {**workers, **{k: workers.get(k, 0.0) + v for k, v in request.items()}}

    def inline_trials(self) -> bool:
        if self.trial_runner == "auto":
            return self.scaling.num_workers == 1 and not self.scaling.use_gpu and self.driver_resource is None
        return self.trial_runner == "inline"

    def log_path(self) -> Path:
        """Where Ray's tables and worker logs go (appended to, so a resumed study keeps one log)."""
        return Path(self.runs_dir).resolve() / f"{self.name}.log"

    def num_trials(self) -> int:
        return math.prod(len(v) for v in self.grid.values()) if self.grid is not None else self.num_samples

    def experiment_path(self) -> str:
        return f"{self.resolved_storage_path().rstrip('/')}/{self.name}"


class _SpaceProbe:
    """Stands in for the ``optuna.Trial`` of a define-by-run space, to list what it suggests: a
    categorical takes the choice ``branch`` names for it (past its end, the first), a number its low end."""

    def __init__(self, branch: list[int]) -> None:
        self.branch, self.widths, self.suggested = branch, [], []

    def suggest_categorical(self, name: str, choices):
        self.suggested.append(("categorical", name, list(choices)))
        pick = self.branch[len(self.widths)] if len(self.widths) < len(self.branch) else 0
        self.widths.append(len(choices))
        return choices[pick]

    def suggest_int(self, name: str, low: int, high: int, step: int = 1, log: bool = False) -> int:
        self.suggested.append(("int", name, low, high, step, log))
        return low

    def suggest_float(self, name: str, low: float, high: float, *, step: Optional[float] = None,
                      log: bool = False) -> float:
        self.suggested.append(("float", name, low, high, step, log))
        return low


def space_branches(space: SearchSpace) -> list[tuple[list, Any]]:
    """Every path through a define-by-run space's categorical choices: what it suggests along the
    path (names, choices, ranges) and the constants it returns there."""
    paths, todo = [], [[]]
    while todo:
        branch = todo.pop()
        probe = _SpaceProbe(branch)
        constants = space(probe)
        paths.append((probe.suggested, constants))
        taken = branch + [0] * (len(probe.widths) - len(branch))
        todo += [taken[:i] + [c] for i in range(len(branch), len(taken)) for c in range(1, probe.widths[i])]
    return paths


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=repr))


def spec_identity(spec: StudySpec) -> dict[str, Any]:
    """What a resumed study cannot change, kept in its state file: ``Tuner.restore`` brings back the
    trial count, search (space, objectives, seed, first points), grid, scheduler and concurrency the
    study began with, and its finished trials ran with the dataset, methods and settings below."""
    from sqlalchemy.engine import make_url

    space = None
    if spec.search_space is not None:
        text = json.dumps(_jsonable(space_branches(spec.search_space)), sort_keys=True)
        space = hashlib.sha256(text.encode()).hexdigest()[:16]
    return _jsonable({
        "num_samples": spec.num_samples if spec.grid is None else None, "grid": spec.grid,
        "search_space": space, "baseline_points": spec.baseline_points, "search_seed": spec.search_seed,
        "objectives": [str(o) for o in spec.objectives], "scheduler": spec.scheduler,
        "max_concurrent": spec.max_concurrent, "methods": spec.methods(), "dataset": spec.dataset,
        "seed": spec.seed, "precision": spec.precision, "fixed_overrides": spec.fixed_overrides,
        "per_method_overrides": spec.per_method_overrides, "workers_per_trial": spec.scaling.num_workers,
        # a restored Tune keeps its FailureConfig, and a trial's checkpoints are its runner's
        "trial_runner": "inline" if spec.inline_trials() else "train", "max_failures": spec.scaling.max_failures,
        **{k: spec.run_options.get(k) for k in ("backbone", "protocol", "class_order", "validation_fraction")},
        # the restored searcher opens the database it was pickled with (a password is not kept)
        "optuna_storage": (None if spec.grid is not None
                           else make_url(spec.resolved_optuna_storage()).render_as_string(hide_password=True)),
    })


def starts_local_ray() -> bool:
    """Whether :func:`ensure_ray` would start a Ray of its own (no RAY_ADDRESS, none running here)."""
    import ray

    return not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")


def local_ray_capacity() -> dict[str, float]:
    """CPUs and GPUs of the Ray :func:`ensure_ray` starts on this machine (Ray's own CPU count, which
    follows a container's CPU quota; the CUDA devices torch sees)."""
    import torch

    try:
        from ray._private.utils import get_num_cpus  # what ray.init counts

        cpus = float(get_num_cpus())
    except (ImportError, AttributeError):
        cpus = float(os.cpu_count() or 1)
    return {"CPU": cpus, "GPU": float(torch.cuda.device_count())}


def check_fits_local_ray(needed: dict[str, float], what: str) -> None:
    """A local Ray has no autoscaler: a request larger than this machine would wait for ever."""
    have = local_ray_capacity()
    short = [f"{needed[k]:g} {k} (this machine has {have.get(k, 0):g})" for k in needed
             if needed[k] > have.get(k, 0) + 1e-9]
    if short:
        raise ValueError(f"{what} asks for {' and '.join(short)}, more than the local Ray started here can give; "
                         "ask for less, or set RAY_ADDRESS to a cluster that has them")


def driver_resource_note(resource: str) -> Optional[str]:
    """A console line when no node of the running cluster offers ``resource`` yet: the trials wait
    for one (an autoscaler may still add it), which Tune only reports in the study log."""
    import ray

    if ray.cluster_resources().get(resource, 0) > 0:
        return None
    return (f"no node offers the resource {resource!r} (--driver-resource) yet: the trials wait until one "
            f"does (the head's `ray start --resources '{{\"{resource}\": 100}}'`, or a node type that has it)")


def ensure_ray() -> None:
    """Attach to the cluster named by RAY_ADDRESS (``ray job submit``), else start a local one."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # The dashboard serves the State API, which Ray Train's placement-group cleaner needs to
        # free the resources of a trial a scheduler stopped (without it they stay reserved).
        # address="local": a new instance even when another one runs on this machine (joining that
        # one is what RAY_ADDRESS is for)
        ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1",
                 object_store_memory=256 * 2**20)


def _trial_driver(config: dict, *, context: dict) -> None:
    """A Tune trial: one CL run, in this process (inline trials) or as a ``TorchTrainer`` fit whose
    results reach Tune through TuneReportCallback. The Train run is named after the trial id, so a
    restarted or resumed trial continues it; an inline trial continues from its Tune checkpoint."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    overrides = dict(config)
    method = overrides.pop("method", context["spec"]["method"])  # a study may compare methods
    seed = overrides.pop("seed", context["spec"]["seed"])  # ... and seeds
    spec = RunSpec(**{**context["spec"], "method": method, "seed": seed,
                      "overrides": {**context["spec"]["overrides"], **context["per_method"].get(method, {}),
                                    **overrides}})
    tracking_info = {**context["tracking"], "key": trial_id, "name": f"trial_{trial_id}"}
    if context["inline"]:
        run_reported({"spec": dataclasses.asdict(spec), "tracking": tracking_info, "progress": context["progress"],
                      "fault": context["fault"], "feature_cache": context["feature_cache"]}, TuneSession())
        return
    trainer = make_trainer(spec, context["scaling"], name=f"train-{trial_id}", storage_path=context["storage_path"],
                           callbacks=[TuneReportCallback()], progress=context["progress"], fault=context["fault"],
                           tracking_info=tracking_info, feature_cache=context["feature_cache"])
    trainer.fit()


def validate_study(spec: StudySpec) -> RunSpec:
    """Raise ValueError on a bad study before Ray or MLflow start (nothing is created here)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", spec.name):
        raise ValueError(f"a study name is letters, digits, '.', '_' and '-' (it names an experiment and a "
                         f"folder), got {spec.name!r}")
    if spec.num_samples < 1 or spec.max_concurrent < 1:
        raise ValueError("num_samples and max_concurrent must be >= 1")
    for what, seed in (("seed", spec.seed), ("search_seed", spec.search_seed),
                       *(("a grid seed", s) for s in (spec.grid or {}).get("seed", ()))):
        if not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise ValueError(f"{what} must be an integer in [0, 2**32 - 1], got {seed!r}")
    check_writable_location("--runs-dir", spec.runs_dir)
    check_writable_location("--storage-path", spec.resolved_storage_path())
    tracking.check_tracking_uri(spec.resolved_tracking_uri())
    if spec.grid is None:  # a search keeps its Optuna study (the default one in runs_dir, unless given)
        check_database_url("--optuna-storage" if spec.optuna_storage else "the Optuna store under --runs-dir",
                           spec.resolved_optuna_storage())
    if spec.grid is not None and (not spec.grid or any(len(v) == 0 for v in spec.grid.values())):
        raise ValueError(f"a study grid needs at least one value per key, got {spec.grid}")
    if (spec.grid is None) == (spec.search_space is None):
        raise ValueError("a study takes either a search space or a grid")
    if spec.trial_runner == "inline" and (spec.scaling.num_workers != 1 or spec.scaling.use_gpu):
        raise ValueError("inline trials run one CPU process; use --trial-runner train for "
                         f"{spec.scaling.num_workers} workers{' with GPUs' if spec.scaling.use_gpu else ''}")
    if spec.feature_cache:
        check_root(spec.resolved_feature_cache())
    if spec.driver_resource is not None and starts_local_ray():
        raise ValueError(f"--driver-resource {spec.driver_resource}: a study without RAY_ADDRESS starts a local "
                         "Ray with no custom resources, so its trials would never start (set RAY_ADDRESS to a "
                         "cluster whose head offers it)")
    if spec.grid is not None and spec.optuna_storage is not None:
        raise ValueError("a grid study runs no Optuna search, so it keeps no Optuna study (--optuna-storage)")
    if any(o.metric == "task_identity_accuracy" for o in spec.objectives):
        blind = [m for m in spec.methods() if not get_method(m).INFERS_TASK]
        if blind:
            raise ValueError(f"{', '.join(blind)} infer(s) no task at test time, so a trial reports no "
                             "task_identity_accuracy to optimise")
    held_out = [str(o) for o in spec.objectives if o.metric.startswith("validation_")]
    if held_out and not spec.run_options.get("validation_fraction"):
        raise ValueError(f"the objective(s) {', '.join(held_out)} read the held-out training images, which runs "
                         "without a validation split (--validation-fraction 0) do not have")
    if spec.scheduler == "asha" and spec.objectives != ACCURACY:
        raise ValueError(f"ASHA compares trials on one accuracy metric per task; --asha needs the objective "
                         f"{ACCURACY[0]}, got {','.join(map(str, spec.objectives))}")
    if spec.search_space is not None:  # a searched setting would override the fixed one in every trial
        searched = {name for suggested, constants in space_branches(spec.search_space)
                    for name in [entry[1] for entry in suggested] + list(constants or {})}
        clash = sorted(searched & set(spec.fixed_overrides))
        if clash:
            raise ValueError(f"--set {', '.join(clash)}: the study searches {'it' if len(clash) == 1 else 'them'}")
    for method in spec.methods():  # every method of a comparison, with its own overrides
        resolved = resolve_run(RunSpec(method=method, dataset=spec.dataset, seed=spec.seed, precision=spec.precision,
                                       **spec.run_options, overrides=spec.overrides_for(method)))
        spec.scaling.check(resolved)
        if not os.environ.get("RAY_ADDRESS"):  # a local Ray's trials read this machine's cache
            check_local_resources(resolved, device=False)
    if starts_local_ray():  # (after the resources' own checks)
        check_fits_local_ray(spec.trial_resources(), "a trial")
    if spec.resume:
        check_resumable(spec)
    return RunSpec(method=spec.method, dataset=spec.dataset, seed=spec.seed, precision=spec.precision,
                   **spec.run_options, overrides=dict(spec.fixed_overrides))


def check_resumable(spec: StudySpec) -> None:
    """A study ``--resume`` would restore must be the one this command describes, and its Optuna
    study must be in the storage the restored searcher opens (else ``Tuner.restore`` fails late)."""
    from ray import tune

    if not tune.Tuner.can_restore(spec.experiment_path()):
        return  # nothing saved yet: a new study starts
    stored = (read_study_state(spec) or {}).get("spec")
    if stored is not None:  # (state files of older versions have no spec, or fewer keys: those not checked)
        given = spec_identity(spec)
        changed = [k for k in sorted(stored) if stored[k] != given.get(k)]
        if changed:
            raise ValueError(f"--resume: study {spec.name!r} at {spec.experiment_path()} began with "
                             + ", ".join(f"{k}={stored.get(k)!r}" for k in changed) + "; this command gives "
                             + ", ".join(f"{k}={given.get(k)!r}" for k in changed)
                             + " (a restored study keeps its settings: rerun it with them, or give another --name)")
    if spec.grid is None and not _optuna_study_exists(spec.resolved_optuna_storage(), spec.name):
        raise ValueError(f"--resume: study {spec.name!r} at {spec.experiment_path()} searches with the Optuna study "
                         f"{spec.name!r}, which {spec.resolved_optuna_storage()} does not hold (it must outlive the "
                         "driver: --runs-dir or --optuna-storage on storage a later job reaches); drop --resume to "
                         "start the study afresh")
    parent, uri = stored_parent_run(spec), spec.resolved_tracking_uri()
    if parent is not None and not tracking.holds_run(uri, parent):
        raise ValueError(f"--resume: study {spec.name!r} at {spec.experiment_path()} logs to the MLflow parent run "
                         f"{parent}, which the tracking store {without_password(uri)} does not hold (resume with the "
                         "--mlflow-uri or MLFLOW_TRACKING_URI it began with, or give another --name)")


def _optuna_study_exists(url: str, name: str) -> bool:
    """Whether the Optuna storage at ``url`` holds study ``name``; creates nothing (no SQLite file, no tables)."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    database = sqlite_file(url)
    if database is not None and not database.is_file():
        return False
    try:
        optuna.storages.RDBStorage(url, skip_table_creation=True).get_study_id_from_name(name)
    except KeyError:
        return False
    except (optuna.exceptions.OptunaError, SQLAlchemyError) as err:  # not an Optuna store, or unreachable
        detail = " ".join(str(err).split())[:200]
        raise ValueError(f"--resume: the Optuna storage {url} cannot be read ({detail})") from None
    return True


class TrialRunStatus(Callback):
    """Driver-side MLflow bookkeeping for what the Train workers cannot do themselves: a trial a
    scheduler stopped ends KILLED (tagged with the task it stopped at), a trial whose worker died
    hard ends FAILED, and child runs of trials a resumed study lost (created after Tune's last
    state save) are deleted, so the study holds one child run per trial. Pickled with the
    Tuner's state, so a resumed study gets it back."""

    def __init__(self, uri: str, experiment_id: str, parent: str) -> None:
        self.uri, self.experiment_id, self.parent = uri, experiment_id, parent

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        if "final_average_accuracy" not in last:
            # a worker interrupted by the stop may have marked its run FAILED first
            self._close(trial.trial_id, "KILLED", {"stopped_at_task": str(last.get("task", 0))},
                        replace=("RUNNING", "FAILED"))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._close(trial.trial_id, "FAILED")

    def on_experiment_end(self, trials, **info):
        known = {t.trial_id for t in trials}
        c = tracking.client(self.uri)
        for run in tracking.children(self.uri, self.experiment_id, self.parent):
            if run.data.tags.get(tracking.RUN_KEY_TAG) not in known:
                c.set_tag(run.info.run_id, "orphaned", "trial lost by an interrupted study driver")
                c.delete_run(run.info.run_id)

    def _close(self, trial_id: str, status: str, tags: Optional[dict[str, str]] = None,
               replace: tuple[str, ...] = ("RUNNING",)) -> None:
        run_id = tracking.find_run(self.uri, self.experiment_id, trial_id)
        if run_id is not None and tracking.client(self.uri).get_run(run_id).info.status in replace:
            tracking.finish(self.uri, run_id, status=status, tags=tags)


class StoredOptunaSearch(OptunaSearch):
    """OptunaSearch over a persistent Optuna study. The database can be ahead of the searcher
    state Tune saved (every few seconds): after a driver loss, a resumed trial that had already
    finished in the database re-delivers its results, which Optuna must not take again (it
    refuses to update a finished trial), and trials asked for after that save are lost (Tune
    never runs them): restoring marks those FAIL. A single objective known only at the end (an
    accuracy, ``train_flops_per_run``) is missing from the per-task reports: those are not
    Optuna's to take."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if isinstance(self.metric, str) and self.metric not in result:
            return
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and self._ot_study._storage.get_trial(ot_trial._trial_id).state.is_finished():
            return
        super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        # Ray's tells an errored trial FAIL only when its result lacks the metrics; the cost ones are
        # in every result, so a crash would otherwise count as COMPLETE (or, beside a missing
        # accuracy, be refused and stay RUNNING).
        super().on_trial_complete(trial_id, None if error else result, error)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        held = {t._trial_id for t in self._ot_trials.values()}
        _fail_running_trials(self._ot_study, "trial lost by an interrupted study driver",
                             lambda trial: trial._trial_id not in held)


STUDY_STATE_FILE = "promptcl_study.json"  # beside Tune's experiment state: the MLflow parent run, the spec
OBJECT_STORES = ("s3", "gcs", "abfs")  # pyarrow file systems whose single put is atomic (and rename is a copy)


class StudyInterrupted(RuntimeError):
    """The study stopped before every trial finished (Ctrl-C); Tune saved what ``--resume`` continues."""


def _parent_run(spec: StudySpec, uri: str, experiment_id: str, resuming: bool) -> str:
    """The study's MLflow parent run: the one a resumed study started with, else a new one. Its
    id is kept beside Tune's experiment state (any storage pyarrow reaches: a path, s3://, gs://),
    with the spec's identity that a resume must match."""
    parent = stored_parent_run(spec) if resuming else None
    if parent is not None:
        tracking.client(uri).update_run(parent, status="RUNNING")
        return parent
    parent = tracking.start_run(uri, experiment_id, f"{spec.name}-study",
                                tags={"study": spec.name, "method": ",".join(spec.methods()), "dataset": spec.dataset})
    tracking.log_params(uri, parent, {"num_samples": spec.num_samples, "max_concurrent": spec.max_concurrent,
                                      "seed": spec.seed, "search_seed": spec.search_seed,
                                      "scheduler": spec.scheduler, "workers_per_trial": spec.scaling.num_workers,
                                      **{f"fixed/{k}": v for k, v in spec.fixed_overrides.items()}})
    _write_study_state(spec, {"parent_run_id": parent, "spec": spec_identity(spec)})
    return parent


def _write_study_state(spec: StudySpec, state: dict[str, Any]) -> None:
    """Atomically, so a driver lost mid-write leaves the old file or none, never a stub: a rename
    on a file system, a single put on an object store."""
    fs, base = _state_fs(spec)
    fs.create_dir(base, recursive=True)
    path = f"{base}/{STUDY_STATE_FILE}"
    staged = path if fs.type_name in OBJECT_STORES else f"{base}/.{STUDY_STATE_FILE}.{os.getpid()}.tmp"
    with fs.open_output_stream(staged) as f:
        f.write(json.dumps(state).encode())
    if staged != path:
        fs.move(staged, path)


def _state_fs(spec: StudySpec):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(_as_uri(spec.experiment_path()))


def read_study_state(spec: StudySpec) -> Optional[dict[str, Any]]:
    """The state file kept beside the study's Tune state, None before the study started; a corrupt
    one raises ValueError (one line)."""
    import pyarrow.fs

    fs, base = _state_fs(spec)
    path = f"{base}/{STUDY_STATE_FILE}"
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        text = f.read().decode(errors="replace")
    try:
        state = json.loads(text)
    except json.JSONDecodeError:  # e.g. a stub left by an older version's in-place write
        state = None
    if not isinstance(state, dict) or not isinstance(state.get("parent_run_id"), str):
        raise ValueError(f"the study state file {path} is corrupt ({text[:60]!r}): delete it to resume with a new "
                         "MLflow parent run, or drop --resume to start the study afresh")
    return state


def stored_parent_run(spec: StudySpec) -> Optional[str]:
    """The MLflow parent run id kept beside the study's Tune state, if the study has started."""
    return (read_study_state(spec) or {}).get("parent_run_id")


def _as_uri(path: str) -> str:
    return path if "://" in path else Path(path).resolve().as_uri()


def run_study(spec: StudySpec, *, validated: Optional[RunSpec] = None) -> list[dict[str, Any]]:
    """Run (or with ``resume``, continue) the study; return one row per completed trial. The
    console gets one line per trial event; the rest of the output goes to ``spec.log_path()``.
    ``validated``: what ``validate_study(spec)`` returned, when the caller has checked it already."""
    run_spec = validated if validated is not None else validate_study(spec)
    resolved = resolve_run(run_spec)
    num_tasks = resolved.num_tasks
    runs_dir = Path(spec.runs_dir).resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    with study_console(spec.log_path(), total=spec.num_trials(), num_tasks=num_tasks,
                       verbose=spec.verbose) as console:
        console.note(f"{spec.name}: {spec.num_trials()} trials of {', '.join(spec.methods())} on {spec.dataset} "
                     f"({num_tasks} tasks), {spec.max_concurrent} at a time"
                     + ("" if spec.verbose else f"; Ray's tables and worker logs: {spec.log_path()}"))
        uri = spec.resolved_tracking_uri()
        experiment_id = tracking.ensure_experiment(uri, spec.name, artifact_dir=runs_dir / "mlartifacts")
        ensure_ray()
        if spec.driver_resource is not None and (note := driver_resource_note(spec.driver_resource)):
            console.note(note)
        if resolved.backbone in LOCAL_BACKBONES and run_spec.pretrained and not run_spec.checkpoint_file:
            local_checkpoint(resolved.backbone)  # made once here, not raced for by concurrent trials
        return _run_tuner(spec, run_spec, num_tasks, uri, experiment_id)


def _run_tuner(spec: StudySpec, run_spec: RunSpec, num_tasks: int, uri: str, experiment_id: str) -> list[dict]:
    from ray import tune

    resuming = spec.resume and tune.Tuner.can_restore(spec.experiment_path())
    parent = _parent_run(spec, uri, experiment_id, resuming)
    try:
        tuner = _make_tuner(spec, run_spec, num_tasks, uri, experiment_id, parent, resuming)
    except BaseException:  # the study run does not stay RUNNING for ever
        tracking.finish(uri, parent, status="FAILED")
        raise
    interrupted = (f"study {spec.name!r} was interrupted; Tune saved it at {spec.experiment_path()}: "
                   "rerun the same command with --resume to continue it")
    try:
        with _lenient_metric_check(spec.objectives != ACCURACY), _terminate_as_interrupt():
            grid = tuner.fit()
    except (KeyboardInterrupt, SystemExit):  # a second Ctrl-C or SIGTERM: resumable all the same
        tracking.finish(uri, parent, status="KILLED")
        raise StudyInterrupted(interrupted) from None
    except BaseException:
        tracking.finish(uri, parent, status="FAILED")
        raise
    if _unfinished_trials(spec) > 0:  # the study goes on with --resume: nothing in it is final yet
        tracking.finish(uri, parent, status="KILLED")
        raise StudyInterrupted(interrupted)
    if spec.grid is None:
        _fail_lost_optuna_trials(spec)
    # Completed trials only: one stopped early by a scheduler has no final metrics.
    rows = [{**result.config, **{k: v for k, v in result.metrics.items() if k in TRIAL_METRICS}}
            for result in grid
            if result.error is None and "final_average_accuracy" in (result.metrics or {})]
    _tag_pareto_front(uri, parent, rows, spec.front_objectives())
    _log_study_summary(uri, parent, rows, spec.selection_metric())
    tracking.finish(uri, parent, status="FAILED" if grid.num_errors else "FINISHED")
    return rows


def _errored_trials(spec: StudySpec) -> int:
    """Trials of the study's saved Tune state that ended in an error."""
    from ray.tune import ExperimentAnalysis
    from ray.tune.experiment import Trial

    return sum(t.status == Trial.ERROR for t in ExperimentAnalysis(spec.experiment_path()).trials)


def _unfinished_trials(spec: StudySpec) -> int:
    """Trials the study's saved Tune state has not finished (or not yet asked for): what --resume
    would run. fit() returns after a first Ctrl-C too, having saved its running trials as RUNNING
    and then stopped them, so its own result lists them TERMINATED."""
    from ray.tune import ExperimentAnalysis
    from ray.tune.experiment import Trial

    saved = ExperimentAnalysis(spec.experiment_path()).trials
    return spec.num_trials() - sum(t.status in (Trial.TERMINATED, Trial.ERROR) for t in saved)


def _make_tuner(spec: StudySpec, run_spec: RunSpec, num_tasks: int, uri: str, experiment_id: str, parent: str,
                resuming: bool):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    context = {
        "spec": {**dataclasses.asdict(run_spec)},
        "tracking": {"uri": uri, "experiment_id": experiment_id, "parent_run_id": parent},
        "storage_path": spec.resolved_storage_path(), "scaling": spec.scaling, "progress": spec.progress,
        "fault": fault_from_env(), "per_method": spec.per_method_overrides, "inline": spec.inline_trials(),
        "feature_cache": spec.resolved_feature_cache(),
    }
    trainable = tune.with_resources(tune.with_parameters(_trial_driver, context=context), spec.trial_request())
    if resuming:
        tuner = tune.Tuner.restore(spec.experiment_path(), trainable=trainable, resume_unfinished=True,
                                   resume_errored=False)
    else:
        # ASHA compares trials at the same task on search_score: within a task it orders them as the
        # average accuracy so far on the held-out images (the test sets' without a validation split),
        # and the searcher ranks a stopped trial below every trial that got further (task_metrics).
        scheduler = (ASHAScheduler(time_attr="task", metric="search_score", mode="max", max_t=num_tasks,
                                   grace_period=1, reduction_factor=2)
                     if spec.scheduler == "asha" else FIFOScheduler())
        if spec.grid is not None:  # every combination once, in order (Tune's grid search)
            search = dict(param_space={k: tune.grid_search(list(v)) for k, v in spec.grid.items()},
                          num_samples=1, search_alg=None)
        else:
            metric, mode = spec.searcher_metric()
            search = dict(param_space=None, num_samples=spec.num_samples,
                          search_alg=StoredOptunaSearch(space=spec.search_space, metric=metric, mode=mode,
                                                  seed=spec.search_seed, study_name=spec.name,
                                                  storage=fresh_optuna_storage(spec),
                                                  points_to_evaluate=[dict(p) for p in spec.baseline_points] or None))
        tuner = tune.Tuner(
            trainable,
            param_space=search.pop("param_space"),
            # an inline trial's process (torch, timm, the backbone's files warm) serves the next trial
            tune_config=tune.TuneConfig(max_concurrent_trials=spec.max_concurrent, scheduler=scheduler,
                                        reuse_actors=spec.inline_trials(), **search),
            run_config=tune.RunConfig(name=spec.name, storage_path=spec.resolved_storage_path(),
                                      callbacks=[TrialRunStatus(uri, experiment_id, parent), TrialEvents()],
                                      # inline trials restart from their last task checkpoint (Train
                                      # workers are restarted by their TorchTrainer instead)
                                      failure_config=tune.FailureConfig(
                                          max_failures=spec.scaling.max_failures if spec.inline_trials() else 0)),
        )
    return tuner


TRIAL_METRICS = (*FINAL_METRICS, "task_identity_accuracy", "mlflow_run_id", "task", "trial_id")


def fresh_optuna_storage(spec: StudySpec):
    """The study's Optuna storage (a SQL database Optuna's own tools open, e.g. optuna-dashboard).
    A study started afresh (not ``--resume``) replaces an Optuna study of the same name, as it
    starts a new MLflow parent run; a resumed one keeps it (the restored searcher refers to it)."""
    import optuna

    make_sqlite_parent(spec.resolved_optuna_storage())
    storage = optuna.storages.RDBStorage(spec.resolved_optuna_storage())
    if any(s.study_name == spec.name for s in optuna.get_all_study_summaries(storage)):
        print(f"Optuna study {spec.name!r} in {spec.resolved_optuna_storage()} replaced (a fresh study; "
              f"--resume continues one)")
        optuna.delete_study(study_name=spec.name, storage=storage)
    # Created here (OptunaSearch loads it) to name its objectives for Optuna's tools.
    metric, mode = spec.searcher_metric()
    metrics, modes = (metric, mode) if isinstance(metric, list) else ([metric], [mode])
    study = optuna.create_study(study_name=spec.name, storage=storage,
                                directions=["maximize" if m == "max" else "minimize" for m in modes])
    with warnings.catch_warnings():  # set_metric_names is marked experimental by Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(metrics)
    return storage


def _fail_lost_optuna_trials(spec: StudySpec) -> None:
    """Once every Tune trial finished, an Optuna trial still RUNNING never ran: mark it FAIL, so
    the Optuna study holds each Tune trial once."""
    import optuna

    study = optuna.load_study(study_name=spec.name, storage=spec.resolved_optuna_storage())
    _fail_running_trials(study, "trial never run by Tune", lambda trial: True)


def _fail_running_trials(study, why: str, lost: Callable[[Any], bool]) -> None:
    import optuna

    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if lost(trial):
            study._storage.set_trial_user_attr(trial._trial_id, "lost", why)
            study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM (a scheduler's, ``ray job stop``'s or ``timeout``'s stop) does what Ctrl-C does: Tune
    saves the study and stops its trials, which end as after a Ctrl-C. (Ray's own handler exits at
    once: the driver could abort, and the running trials' MLflow runs stayed RUNNING.) A handler
    can only be set in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):  # whatever SIGINT does now: Tune's graceful stop, then KeyboardInterrupt
        handler = signal.getsignal(signal.SIGINT)
        if not callable(handler):
            raise KeyboardInterrupt
        handler(signal.SIGINT, frame)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _lenient_metric_check(lenient: bool):
    """Tune insists that every result carries the searcher's metrics. Accuracy objectives other
    than the per-task ``search_score`` exist only in a trial's final result (cost ones in every
    result); Optuna reads multi-objective values from the final result alone, so the check is
    relaxed while such a study runs."""
    key = "TUNE_DISABLE_STRICT_METRIC_CHECKING"
    before = os.environ.get(key)
    if lenient:
        os.environ[key] = "1"
    try:
        yield
    finally:
        if lenient:
            if before is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = before


def _tag_pareto_front(uri: str, parent: str, rows: list[dict[str, Any]], objectives: tuple[Objective, ...]) -> None:
    """Child runs on the front of ``objectives`` get ``pareto=true`` (the others ``false``); the
    parent lists them (tag ``pareto_trials``, artifact ``pareto.json``)."""
    rows = [r for r in rows if all(r.get(o.metric) is not None for o in objectives)]
    if not rows:
        return
    c = tracking.client(uri)
    front = []
    for row, on_front in zip(rows, pareto_mask(rows, objectives)):
        if row.get("mlflow_run_id"):
            c.set_tag(row["mlflow_run_id"], "pareto", str(on_front).lower())
        if on_front:
            front.append({"trial_id": row.get("trial_id"), "mlflow_run_id": row.get("mlflow_run_id"),
                          **{o.metric: row[o.metric] for o in objectives}})
    c.set_tag(parent, "objectives", ",".join(map(str, objectives)))
    c.set_tag(parent, "pareto_trials", ",".join(str(r["trial_id"]) for r in front))
    c.log_dict(parent, {"objectives": [str(o) for o in objectives], "front": front}, "pareto.json")


def _log_study_summary(uri: str, parent: str, rows: list[dict[str, Any]], selected_by: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not rows:
        return
    best = max(rows, key=lambda r: r[selected_by])  # (its test FA either way)
    tracking.log_metrics(uri, parent, {"best_final_average_accuracy": best["final_average_accuracy"],
                                       "completed_trials": len(rows)})
    with tempfile.TemporaryDirectory() as tmp:
        pq.write_table(pa.Table.from_pylist(rows), Path(tmp) / "trials.parquet")
        tracking.client(uri).log_artifacts(parent, tmp)


def best_per(rows: list[dict[str, Any]], key: str, selected_by: str = "final_average_accuracy") -> list[dict[str, Any]]:
    """The trial with the highest ``selected_by`` (an FA) for each value of ``key``, sorted by that value."""
    best: dict[Any, dict[str, Any]] = {}
    for row in rows:
        value = row.get(key)
        if value not in best or row[selected_by] > best[value][selected_by]:
            best[value] = row
    return [best[v] for v in sorted(best)]


def format_table(rows: list[dict[str, Any]], params: list[str]) -> str:
    """Accuracy vs parameters/FLOPs, one line per trial."""
    validated = any("validation_final_average_accuracy" in r for r in rows)  # runs with a validation split
    head = [*params, *(["val FA"] if validated else []), "FA", "CA", "FM", "trainable", "test MFLOPs/img"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        cells = ["-" if r.get(p) is None else f"{r[p]:.3g}" if isinstance(r[p], float) else str(r[p])
                 for p in params]
        cells += [f"{r['validation_final_average_accuracy']:.2f}"] if validated else []
        cells += [f"{r['final_average_accuracy']:.2f}", f"{r['cumulative_average_accuracy']:.2f}",
                  f"{r['forgetting']:.2f}", f"{int(r['trainable_params']):,}",
                  f"{r['test_flops_per_image'] / 1e6:.2f}"]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


# What a search holds out of each class's training images to select on (a grid that only compares
# fixed configurations passes 0): selection on the test sets would flatter the chosen trials.
SEARCH_VALIDATION_FRACTION = 0.1


def study_parser(description: str, *, name: str, num_samples: int, objectives: tuple[Objective, ...] = ACCURACY,
                 validation_fraction: float = SEARCH_VALIDATION_FRACTION):
    """The flags every study script shares; ``objectives`` and ``validation_fraction`` are the study's defaults."""
    import argparse

    def objectives_arg(text: str) -> tuple[Objective, ...]:
        try:
            return parse_objectives(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    def setting_arg(text: str) -> tuple[str, str]:
        try:
            return next(iter(parse_overrides([text]).items()))
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", dest="settings", type=setting_arg, action="append", default=[], metavar="KEY=VALUE",
                   help="a method setting every trial runs with (not one the study searches), as promptcl run's")
    p.add_argument("--dataset", default=None,
                   help=f"default: {DEFAULT_STUDY_DATASET} (the offline benchmark), {SMOKE_DATASET} with --smoke")
    p.add_argument("--num-samples", type=int, default=None, help=f"trials (default {num_samples}; 2 with --smoke)")
    p.set_defaults(default_num_samples=num_samples)
    p.add_argument("--backbone", default=None,
                   help="default: each method's for the dataset (as promptcl run; e.g. sup1k_augreg for coda and ovor)")
    p.add_argument("--checkpoint-file", default=None, help="backbone weights from a file every worker can read")
    p.add_argument("--data-dir", default=None,
                   help="root of a disk benchmark, visible to every worker (default: $PROMPTCL_DATA)")
    p.add_argument("--split-file", default=None, help="ImageNet-R's train/test split file (as promptcl run)")
    p.add_argument("--protocol", choices=PROTOCOLS, default=None, help="a disk benchmark's input pipeline")
    p.add_argument("--compile-backbone", action="store_true", default=None,
                   help="torch.compile each trial's frozen un-prompted pass (pays off on long GPU runs)")
    p.add_argument("--max-concurrent", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="CL run seed (class order, init)")
    p.add_argument("--class-order", choices=CLASS_ORDERS, default=None,
                   help="seeded (default): shuffled by the run seed; natural: the dataset's own order; "
                        "seeded-except-0: natural at seed 0 (as promptcl run)")
    p.add_argument("--search-seed", type=int, default=0)
    p.add_argument("--runs-dir", type=Path, default=tracking.default_runs_dir())
    p.add_argument("--mlflow-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite in --runs-dir")
    p.add_argument("--storage-path", default=None, help="Ray results; shared storage on a cluster")
    p.add_argument("--progress", action="store_true", help="per-epoch progress bars in worker logs")
    p.add_argument("--verbose", action="store_true",
                   help="Ray's status tables and worker logs on the console (default: in RUNS_DIR/NAME.log)")
    p.add_argument("--no-report", action="store_true", help="skip the HTML report at the end")
    p.add_argument("--no-feature-cache", action="store_true",
                   help="trials make their own un-prompted backbone passes (default: shared via the storage path)")
    p.add_argument("--trial-runner", choices=("auto", "inline", "train"), default="auto",
                   help="train: each trial fits a Ray Train TorchTrainer; inline: a one-worker trial runs in the "
                        "Tune trial itself; auto (default): inline for one CPU worker per trial")
    p.add_argument("--workers-per-trial", type=int, default=1,
                   help="Ray Train workers per trial (data-parallel; the method's batch size is the global one)")
    p.add_argument("--use-gpu", action="store_true", help="give each Train worker GPUs (NCCL between them)")
    p.add_argument("--gpus-per-worker", type=float, default=None, help="with --use-gpu (default 1)")
    p.add_argument("--cpus-per-worker", type=float, default=None,
                   help="default: 0.99 on CPU workers (two trials share a 2-core box), 1 with --use-gpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: autocast on the worker's device")
    p.add_argument("--max-failures", type=int, default=0,
                   help="restarts of a trial's run after its worker dies (from the last task checkpoint; -1: no limit)")
    p.add_argument("--resume", action="store_true",
                   help="continue the study stored under --storage-path/--name if there is one (driver loss)")
    p.add_argument("--driver-resource", default=None, metavar="NAME",
                   help="custom resource the trial drivers request instead of CPU (a cluster's head node)")
    p.add_argument("--asha", action="store_true", help="stop weak trials early at task boundaries")
    p.add_argument("--objectives", type=objectives_arg, default=None, metavar="METRIC:max|min,...",
                   help="what Optuna optimises; several give a Pareto front "
                        f"(default {','.join(map(str, objectives))}; with --validation-fraction, FA on the "
                        "held-out images)")
    p.add_argument("--validation-fraction", type=float, default=validation_fraction, metavar="F",
                   help="hold out this seeded, stratified fraction of each class's training images (at most 0.5) "
                        "and select trials on them (search score, ASHA, best trials, default objectives) instead "
                        f"of on the test sets, whose figures are still reported; 0: select on the test sets "
                        f"(default {validation_fraction:g})")
    p.set_defaults(default_objectives=objectives)
    p.add_argument("--optuna-storage", default=None, metavar="URL",
                   help="SQLAlchemy URL of the persistent Optuna study (default sqlite:///RUNS_DIR/optuna.db)")
    p.add_argument("--name", default=name)
    p.add_argument("--smoke", action="store_true",
                   help=f"2 short trials on {SMOKE_DATASET} unless --dataset (about a minute on 2 cores)")
    return p


DEFAULT_STUDY_DATASET = "mnist5k"  # real images, a backbone that beats pixels on them (README)
SMOKE_DATASET = "digits"  # the fast fixture


def study_dataset(args) -> str:
    return args.dataset or (SMOKE_DATASET if args.smoke else DEFAULT_STUDY_DATASET)


def _run_options(args) -> dict[str, Any]:
    """The run options a study's trials share; paths made absolute here, since Ray Tune runs each
    trial in its own directory (and a cluster's workers may lack the driver's $PROMPTCL_DATA)."""
    from promptcl.data.benchmarks import DATASETS, data_root

    options = {key: getattr(args, key) for key in ("backbone", "checkpoint_file", "data_dir", "split_file", "protocol",
                                                    "class_order", "compile_backbone", "validation_fraction")
               if getattr(args, key) is not None}
    dataset = DATASETS.get(study_dataset(args))  # an unknown one is reported by validate_study
    if dataset is not None and dataset.needs_data_dir and data_root(args.data_dir)[0] is not None:
        options["data_dir"] = data_root(args.data_dir)[0]
    paths = ("checkpoint_file", "data_dir", "split_file")
    return {k: str(Path(v).resolve()) if k in paths else v for k, v in options.items()}


def spec_from_args(args, *, method: str, search_space: SearchSpace, smoke_overrides: dict[str, Any],
                   baseline_points: tuple[dict[str, Any], ...] = ()) -> StudySpec:
    return StudySpec(
        baseline_points=baseline_points,
        name=args.name + ("_smoke" if args.smoke else ""), method=method, dataset=study_dataset(args),
        search_space=search_space,
        num_samples=(args.num_samples if args.num_samples is not None
                     else 2 if args.smoke else args.default_num_samples),
        max_concurrent=args.max_concurrent, seed=args.seed, search_seed=args.search_seed,
        fixed_overrides={**(smoke_overrides if args.smoke else {}), **dict(args.settings)}, runs_dir=args.runs_dir,
        tracking_uri=args.mlflow_uri, storage_path=args.storage_path,
        scaling=Scaling(num_workers=args.workers_per_trial, use_gpu=args.use_gpu,
                        cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
                        max_failures=args.max_failures),
        precision=args.precision, resume=args.resume, driver_resource=args.driver_resource,
        run_options=_run_options(args),
        progress=args.progress, verbose=args.verbose, report=not args.no_report, trial_runner=args.trial_runner,
        feature_cache=not args.no_feature_cache,
        scheduler="asha" if args.asha else "fifo",
        objectives=args.objectives or (on_validation(args.default_objectives) if args.validation_fraction
                                       else args.default_objectives),
        optuna_storage=args.optuna_storage,
    )


def run_study_script(spec: StudySpec, *, table_params: list[str], best_by: str, prog: str) -> int:
    """Validate, run, and print the best trials and the accuracy-vs-cost table of a study."""
    try:
        validated = validate_study(spec)
        fault_from_env()
    except ValueError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    try:
        rows = run_study(spec, validated=validated)
    except StudyInterrupted as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 130
    selected_by = spec.selection_metric()
    on = " (selected on the validation images; FA etc. on the test sets)" if selected_by != "final_average_accuracy" \
        else ""
    ranked = sorted(rows, key=lambda r: -r[selected_by])
    print(f"\nBest trials{on}:\n" + format_table(ranked[:5], table_params))
    print(f"\nBest trial per {best_by} (accuracy vs parameters and test FLOPs){on}:\n"
          + format_table(best_per(rows, best_by, selected_by), table_params))
    if len(spec.objectives) > 1:
        front = [r for r, on in zip(rows, pareto_mask(rows, spec.objectives)) if on]
        print(f"\nPareto front of {', '.join(map(str, spec.objectives))} (MLflow tag pareto=true):\n"
              + format_table(sorted(front, key=lambda r: r["trainable_params"]), table_params))
    print(f"\nOptuna: study {spec.name!r} in {spec.resolved_optuna_storage()}; "
          f"browse it with: optuna-dashboard {spec.resolved_optuna_storage()}")
    print_study_paths(spec, report=spec.report and bool(rows))
    errored = _errored_trials(spec)
    if errored:  # (the study's MLflow run ended FAILED)
        print(f"{prog}: {errored} of {spec.num_trials()} trials failed; their errors are in {spec.log_path()}",
              file=sys.stderr)
    return 0 if rows and not errored else 1


def print_study_paths(spec: StudySpec, *, report: bool) -> None:
    """The closing lines of every study script: its log, its report (built here unless ``report``
    is false), its MLflow store and how to open the UI."""
    uri = spec.resolved_tracking_uri()
    print(f"Log:    {spec.log_path()}")
    if report:
        from promptcl.study.report import report_from_mlflow

        out = Path(spec.runs_dir).resolve() / spec.name / "report"
        page = report_from_mlflow(uri, spec.name, out, parent_run_id=stored_parent_run(spec))
        print(f"Report: {page}")
    print(f"MLflow: {uri} (experiment {spec.name!r}); UI: mlflow ui --backend-store-uri {uri} --host 127.0.0.1")
