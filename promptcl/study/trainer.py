"""One CL run on N Ray Train workers (data-parallel), with restarts from task checkpoints.

:func:`train_worker` runs on every Train worker: it drives :func:`promptcl.engine.run_sequence`
(which shards data and reduces gradients and statistics over the process group Ray Train sets up)
and reports after every task, rank 0 attaching the task checkpoint. After a worker dies, Ray
Train restarts the whole group (``Scaling.max_failures``) and every rank continues from the last
reported checkpoint. :func:`make_trainer` builds the ``TorchTrainer`` for ``promptcl run
--num-workers`` and for each study trial. :func:`run_reported` is the same run with its reporting
behind a session, so a single-process study trial can run it in the Tune trial itself
(:class:`TuneSession`) without starting a worker group.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from promptcl.study import tracking
from promptcl.distributed import check_divisible
from promptcl.engine import FINAL_METRICS, ResolvedRun, RunSpec, resolve_run
from promptcl.study.objectives import COST_METRICS

# "task=T,rank=R": the Train worker of rank R exits hard right after reporting task T (0-based)
# in an attempt that started from scratch, so a restart from that checkpoint does not fire again.
FAULT_ENV = "PROMPTCL_INJECT_WORKER_FAULT"


@dataclass(frozen=True, kw_only=True)
class Scaling:
    """How one run spreads over Ray Train workers."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: Optional[float] = None  # None: 0.99 on CPU (two trials fit 2 cores), 1 with GPUs
    gpus_per_worker: Optional[float] = None  # None: 1 with GPUs; only with use_gpu
    max_failures: int = 0  # Train restarts after a worker failure; -1: no limit

    def check(self, run: ResolvedRun) -> None:
        """Raise ValueError before any work when the run cannot be spread this way."""
        check_divisible(run.config.batch_size, self.num_workers)
        batch_dependent = run.batch_dependent_switches()
        if self.num_workers > 1 and batch_dependent:
            raise ValueError(f"{' and '.join(batch_dependent)}: a sample's prompts or loss depend on its whole batch, "
                             f"which {self.num_workers} workers would split into shards; run it on one worker")
        conflict = getattr(run.config, "shard_conflict", lambda workers: None)(self.num_workers)
        if conflict:
            raise ValueError(conflict)
        for what, amount in (("cpus_per_worker", self.cpus_per_worker), ("gpus_per_worker", self.gpus_per_worker)):
            if amount is not None and not (math.isfinite(amount) and amount > 0):
                raise ValueError(f"{what} must be a finite number > 0, got {amount}")
        if self.gpus_per_worker is not None and not self.use_gpu:
            raise ValueError("gpus_per_worker needs use_gpu (workers without it get no GPU)")
        if str(run.spec.device).startswith("cuda") and not self.use_gpu:
            raise ValueError(f"device {run.spec.device!r} on Ray Train workers needs use_gpu (workers without it "
                             "get no GPU)")
        if self.max_failures < -1:
            raise ValueError(f"max_failures must be >= -1 (-1: no limit), got {self.max_failures}")

    def resources_per_worker(self) -> dict[str, float]:
        cpus = self.cpus_per_worker if self.cpus_per_worker is not None else (1.0 if self.use_gpu else 0.99)
        return {"CPU": cpus, **({"GPU": self.gpus_per_worker or 1.0} if self.use_gpu else {})}

    def group_resources(self) -> dict[str, float]:
        """What all the workers of one run hold together."""
        return {k: v * self.num_workers for k, v in self.resources_per_worker().items()}

    def train_configs(self):
        """Ray Train's (TorchConfig, ScalingConfig) for these workers: gloo moves the CPU-side
        collectives, NCCL the GPU ones."""
        from ray.train import ScalingConfig
        from ray.train.torch import TorchConfig

        return (TorchConfig(backend="cpu:gloo,cuda:nccl" if self.use_gpu else "gloo"),
                ScalingConfig(num_workers=self.num_workers, use_gpu=self.use_gpu,
                              resources_per_worker=self.resources_per_worker()))


def fault_from_env() -> Optional[dict[str, int]]:
    """The fault-injection hook (tests): ``PROMPTCL_INJECT_WORKER_FAULT=task=2,rank=1``."""
    value = os.environ.get(FAULT_ENV)
    if not value:
        return None
    try:
        fault = {k.strip(): int(v) for k, v in (item.split("=") for item in value.split(","))}
        if set(fault) != {"task", "rank"}:
            raise ValueError
    except ValueError:
        raise ValueError(f"{FAULT_ENV} must look like task=2,rank=1, got {value!r}") from None
    return fault


class TrainSession:
    """Where a CL run reports to and restores from when it runs on a Ray Train worker."""

    def __init__(self) -> None:
        import ray.train

        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()

    def report(self, metrics: dict[str, Any], checkpoint_dir: Optional[str], name: str) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)

    def checkpoint(self):
        import ray.train

        return ray.train.get_checkpoint()

    def barrier(self) -> None:
        import ray.train

        ray.train.collective.barrier()

    def storage(self):
        import ray.train

        return ray.train.get_context().get_storage()


class TuneSession:
    """The same for a single-process run inside the Tune trial itself: results and task
    checkpoints go straight to Tune, which restores the trial from its last one (after a failure
    within ``max_failures``, or when a study resumes)."""

    rank, world_size = 0, 1

    def report(self, metrics: dict[str, Any], checkpoint_dir: Optional[str], name: str) -> None:
        import ray.tune

        ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir
                        else None)

    def checkpoint(self):
        import ray.tune

        return ray.tune.get_checkpoint()

    def barrier(self) -> None:
        pass

    def storage(self):
        import ray.tune

        return ray.tune.get_context().get_storage()


def check_node_sees_locations(storage, tracking_uri: Optional[str] = None) -> None:
    """Raise (one line) unless this node sees the run's Ray storage (``storage``: Ray's
    StorageContext) and, given one, the MLflow store's SQLite file. Ray persists a reported
    checkpoint from the worker that reports it and finds only then, after the first task's training,
    that a local path on the head node is missing here; MLflow would make an empty database here.
    This fails at the worker's start instead."""
    import pyarrow.fs
    import ray

    from promptcl.storage import sqlite_file

    where = f"node {ray.util.get_node_ip_address()}, where this worker runs"
    if storage.storage_filesystem.get_file_info(storage.experiment_fs_path).type == pyarrow.fs.FileType.NotFound:
        location = f"{storage.storage_filesystem.type_name}:{storage.experiment_fs_path}"
        raise RuntimeError(f"Ray's storage {location!r} is not visible on {where}: put --storage-path (a study) "
                           "or --out (promptcl run) on storage every node mounts (NFS, a shared volume) or on a "
                           "URI (s3://, gs://)")
    database = sqlite_file(tracking_uri) if tracking_uri else None
    if database is not None and not database.is_file():
        raise RuntimeError(f"the MLflow store {tracking_uri!r} is not on {where}: give --mlflow-uri a tracking "
                           "server every node reaches (see ray_jobs/README.md)")


def _restored_checkpoint(session) -> Optional[Path]:
    """The last reported task checkpoint after a restart, copied locally."""
    restored = session.checkpoint()
    if restored is None:
        return None
    with restored.as_directory() as d:
        local = Path(tempfile.mkdtemp(prefix="promptcl-resume-"))
        shutil.copytree(d, local, dirs_exist_ok=True)
    return sorted(local.glob("task_*.pt"))[-1]


def task_metrics(acc: np.ndarray, validation: Optional[np.ndarray] = None) -> dict[str, float]:
    """What every report carries: tasks done, average accuracy on the seen tasks, and a
    searcher score comparable across milestones (surviving longer always ranks higher). With a
    validation split (``validation``: its matrix so far) the score reads the validation accuracy,
    so neither the searcher nor a scheduler looks at the test sets."""
    t = acc.shape[0] - 1
    average = float(acc[t].mean())
    metrics = {"task": t + 1, "average_accuracy": average, "search_score": t + average / 100.0,
               **{f"acc/task_{i}": float(a) for i, a in enumerate(acc[t])}}
    if validation is not None:
        held_out = float(np.asarray(validation)[t].mean())
        metrics.update(validation_average_accuracy=held_out, search_score=t + held_out / 100.0)
    return metrics


def cost_metrics(cost: dict[str, Any]) -> dict[str, Any]:
    """The cost part of a report: known before training, so every report carries it (a
    multi-objective searcher can rank trials on cost at any point)."""
    return {k: cost[k] for k in COST_METRICS}


def train_worker(cfg: dict) -> None:
    """One CL sequence on a Ray Train worker (see :func:`run_reported`)."""
    run_reported(cfg, TrainSession())


def run_reported(cfg: dict, session) -> None:
    """One CL sequence reporting after every task to ``session`` (:class:`TrainSession` on a Train
    worker, :class:`TuneSession` in a single-process trial). ``cfg``: ``spec`` (RunSpec fields),
    optional ``tracking`` (MLflow child run of a study trial: uri, experiment_id, parent_run_id,
    key, name), ``progress``, ``fault``, ``feature_cache``."""
    import ray
    import torch

    from promptcl.engine import run_sequence

    check_node_sees_locations(session.storage(), (cfg.get("tracking") or {}).get("uri"))
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    torch.set_num_threads(max(1, int(round(cpus))))  # a reused worker keeps its first thread count
    run = resolve_run(RunSpec(**cfg["spec"]))
    rank0 = session.rank == 0
    resume_from = _restored_checkpoint(session)
    # one line per worker in the study log (Ray prefixes it with the process): what runs where
    trial = f"trial {cfg['tracking']['key']}: " if cfg.get("tracking") else ""
    print(f"promptcl: {trial}{run.spec.method} on {run.spec.dataset}, seed {run.spec.seed}, rank {session.rank} "
          f"of {session.world_size}" + (f", resuming after {resume_from.stem}" if resume_from is not None else ""),
          flush=True)
    track = cfg.get("tracking") if rank0 else None
    run_id = None
    if track:
        run_id, created = tracking.find_or_start_run(
            track["uri"], track["experiment_id"], track["name"], key=track["key"],
            parent_run_id=track["parent_run_id"],
            tags={"trial_id": track["key"], "method": run.spec.method, "dataset": run.spec.dataset,
                  "ray_node_id": ray.get_runtime_context().get_node_id(), **run.protocol_tags()})
        if resume_from is not None:  # a restarted worker group: say from where
            tracking.client(track["uri"]).set_tag(run_id, "restarted_from_task", resume_from.stem.split("_")[1])
        if created:
            tracking.log_params(track["uri"], run_id, {**run.flat_params(), "run/num_workers": session.world_size})
    fault = cfg.get("fault")

    def report(metrics: dict[str, Any], files: list[Path]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            for f in files:
                shutil.copy2(f, tmp)
            session.report({**metrics, "mlflow_run_id": run_id or ""}, tmp if rank0 else None,
                           f"task_{metrics['task'] - 1:02d}")

    def on_task_end(r) -> None:
        if track:
            tracking.log_task(track["uri"], run_id, r.task, r.accuracy)
        if r.task < r.num_tasks - 1:  # the last task is reported with the final metrics below
            report({**task_metrics(r.accuracy, r.validation), **cost_metrics(r.cost)}, [r.checkpoint] if rank0 else [])
        if fault and fault["task"] == r.task and resume_from is None:
            session.barrier()  # every rank's report is in before one of them dies
            if session.rank == fault["rank"]:
                # Train's controller takes reports when it polls the workers (every
                # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s): two polls' time to take this task's
                # checkpoint, else the restart resumes from the one before (as after any real crash)
                time.sleep(2 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0)))
                os._exit(1)

    out_dir = Path(tempfile.mkdtemp(prefix="promptcl-run-"))
    try:
        if resume_from is not None and (resume_from.parent / "summary.json").is_file():
            # The run had finished (a resumed study re-fits it): hand back its final report.
            for name in ("summary.json", "results.parquet"):
                shutil.copy2(resume_from.parent / name, out_dir)
            (out_dir / "checkpoints").mkdir()
            shutil.copy2(resume_from, out_dir / "checkpoints")
            summary = json.loads((out_dir / "summary.json").read_text())
        else:
            summary = run_sequence(run, out_dir, on_task_end=on_task_end, progress=cfg.get("progress", False),
                                   resume_from=resume_from, feature_cache=cfg.get("feature_cache"))
        final = {k: summary[k] for k in (*FINAL_METRICS, "task_identity_accuracy") if k in summary}
        if track:
            tracking.log_run_outputs(track["uri"], run_id, summary, out_dir)
            tracking.finish(track["uri"], run_id)
        files = ([out_dir / "results.parquet", out_dir / "summary.json",
                  sorted((out_dir / "checkpoints").glob("task_*.pt"))[-1]] if rank0 else [])
        report({**task_metrics(np.asarray(summary["accuracy_matrix"]), summary.get("validation_matrix")), **final},
               files)
    except BaseException:
        # A scheduler's stop can interrupt the worker after the driver marked the run KILLED.
        if track and run_id and tracking.client(track["uri"]).get_run(run_id).info.status == "RUNNING":
            tracking.finish(track["uri"], run_id, status="FAILED")
        raise
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
        if resume_from is not None:
            shutil.rmtree(resume_from.parent, ignore_errors=True)


def _evaluate_worker(cfg: dict) -> None:
    import ray.train

    from promptcl.engine import evaluate_checkpoint

    accuracy = evaluate_checkpoint(resolve_run(RunSpec(**cfg["spec"])), Path(cfg["checkpoint"]))
    metrics = {"accuracy": accuracy.tolist(), "num_workers": ray.train.get_context().get_world_size()}
    # Train keeps the metrics of reports that carry a checkpoint: rank 0 attaches a tiny one.
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "evaluation.json").write_text(json.dumps(metrics))
        rank0 = ray.train.get_context().get_world_rank() == 0
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank0 else None)


def evaluate_on_workers(spec: RunSpec, checkpoint: Path, scaling: Scaling, *, storage_path: str) -> np.ndarray:
    """Accuracy on every seen task of the model in ``checkpoint``, its test sets sharded over
    ``scaling.num_workers`` Train workers (exactly the single-process accuracies)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    torch_config, scaling_config = scaling.train_configs()
    result = TorchTrainer(
        _evaluate_worker, train_loop_config={"spec": dataclasses.asdict(spec), "checkpoint": str(checkpoint)},
        torch_config=torch_config, scaling_config=scaling_config,
        run_config=ray.train.RunConfig(name="evaluate", storage_path=storage_path),
    ).fit()
    assert result.metrics["num_workers"] == scaling.num_workers
    return np.asarray(result.metrics["accuracy"])


def make_trainer(spec: RunSpec, scaling: Scaling, *, name: str, storage_path: str, callbacks=(),
                 tracking_info: Optional[dict] = None, progress: bool = False,
                 fault: Optional[dict[str, int]] = None, feature_cache: Optional[str] = None):
    """A ``TorchTrainer`` running ``spec`` on ``scaling.num_workers`` workers. A fixed ``name``
    under ``storage_path`` makes a new fit of the same name continue from its last checkpoint."""
    import ray.train
    from ray.train import FailureConfig
    from ray.train.torch import TorchTrainer

    torch_config, scaling_config = scaling.train_configs()
    return TorchTrainer(
        train_worker,
        train_loop_config={"spec": dataclasses.asdict(spec), "tracking": tracking_info, "progress": progress,
                           "fault": fault, "feature_cache": feature_cache},
        torch_config=torch_config, scaling_config=scaling_config,
        run_config=ray.train.RunConfig(name=name, storage_path=storage_path, callbacks=list(callbacks),
                                       failure_config=FailureConfig(max_failures=scaling.max_failures)),
    )
