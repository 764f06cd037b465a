"""Ray Tune + Optuna studies whose trials each run a whole CL sequence through Ray Train.

Three layers (the Ray Train V2 pattern): ``_train_worker`` runs on each Train worker and drives
:func:`promptcl.engine.run_sequence`, reporting after every task; ``_trial_driver`` is the Tune
trial, which builds and fits a ``TorchTrainer``; :func:`run_study` builds the ``Tuner`` with an
``OptunaSearch`` over a define-by-run space. MLflow: a parent run per study (made here, before any
trial starts), a child run per trial (made by the rank-0 worker).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import numpy as np

from promptcl import tracking
from promptcl.engine import FINAL_METRICS, RunSpec, resolve_run

MLFLOW_RUN_FILE = "mlflow_run.json"
SearchSpace = Callable[[Any], Optional[dict]]  # optuna.Trial -> constants (define-by-run)


@dataclass(frozen=True, kw_only=True)
class StudySpec:
    name: str
    method: str
    dataset: str
    search_space: SearchSpace
    num_samples: int = 8
    max_concurrent: int = 2
    seed: int = 0
    fixed_overrides: dict[str, Any] = field(default_factory=dict)
    runs_dir: Path = Path("runs")
    tracking_uri: Optional[str] = None  # default: sqlite under runs_dir (or $MLFLOW_TRACKING_URI)
    storage_path: Optional[str] = None  # default: runs_dir/ray_results; use shared storage on clusters
    cpus_per_worker: float = 0.99
    num_workers: int = 1
    use_gpu: bool = False
    search_seed: int = 0
    scheduler: Literal["fifo", "asha"] = "fifo"
    metric: str = "average_accuracy"
    progress: bool = False  # per-epoch progress bars in the Train workers' logs
    baseline_points: tuple[dict[str, Any], ...] = ()  # configurations the search evaluates first

    def resolved_tracking_uri(self) -> str:
        return self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or tracking.default_tracking_uri(self.runs_dir)

    def resolved_storage_path(self) -> str:
        return self.storage_path or str((Path(self.runs_dir) / "ray_results").resolve())


def ensure_ray(num_cpus: Optional[int] = None) -> None:
    """Attach to the cluster named by RAY_ADDRESS (``ray job submit``), else start a local one."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=num_cpus, include_dashboard=False, object_store_memory=256 * 2**20)


def _train_worker(cfg: dict) -> None:
    """One trial's CL sequence on a Ray Train worker; reports after every task."""
    import ray
    import ray.train
    import torch
    from ray.train import Checkpoint

    from promptcl.engine import run_sequence

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    torch.set_num_threads(max(1, int(round(cpus))))  # a reused worker keeps its first thread count
    run = resolve_run(RunSpec(**cfg["spec"]))
    ctx = ray.train.get_context()
    rank0 = ctx.get_world_rank() == 0
    uri = cfg["tracking_uri"]
    # After a restart (preemption, node loss) continue from the last task boundary, in the same
    # MLflow run, instead of starting over.
    restored = ray.train.get_checkpoint()
    resume_from = child = None
    if restored is not None:
        with restored.as_directory() as d:
            resume_dir = Path(tempfile.mkdtemp(prefix="promptcl-resume-"))
            shutil.copytree(d, resume_dir, dirs_exist_ok=True)
        resume_from = sorted(resume_dir.glob("task_*.pt"))[-1]
        child = json.loads((resume_dir / MLFLOW_RUN_FILE).read_text())["run_id"] if rank0 else None
    elif rank0:
        child = tracking.start_run(uri, cfg["experiment_id"], cfg["trial_name"], parent_run_id=cfg["parent_run_id"],
                                   tags={"trial_id": cfg["trial_id"], "method": run.spec.method,
                                         "dataset": run.spec.dataset, **run.protocol_tags()})
        tracking.log_params(uri, child, run.flat_params())

    def task_metrics(acc: np.ndarray) -> dict[str, float]:
        t = acc.shape[0] - 1
        return {"task": t + 1, "average_accuracy": float(acc[t].mean()),
                **{f"acc/task_{i}": float(a) for i, a in enumerate(acc[t])}}

    def report(metrics: dict[str, Any], files: list[Path]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            for f in files:
                shutil.copy2(f, tmp)
            (Path(tmp) / MLFLOW_RUN_FILE).write_text(json.dumps({"run_id": child}))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp) if rank0 else None)

    def on_task_end(r) -> None:
        if rank0:
            tracking.log_task(uri, child, r.task, r.accuracy)
        if r.task < r.num_tasks - 1:  # the last task is reported with the final metrics below
            report(task_metrics(r.accuracy), [r.checkpoint])

    out_dir = Path(tempfile.mkdtemp(prefix="promptcl-trial-"))
    try:
        summary = run_sequence(run, out_dir, on_task_end=on_task_end, progress=cfg.get("progress", False),
                               resume_from=resume_from)
        acc = np.asarray(summary["accuracy_matrix"])
        final = {k: summary[k] for k in (*FINAL_METRICS, "task_identity_accuracy") if k in summary}
        if rank0:
            tracking.log_run_outputs(uri, child, summary, out_dir)
            tracking.finish(uri, child)
        last_ckpt = sorted((out_dir / "checkpoints").glob("task_*.pt"))[-1]
        report({**task_metrics(acc), **final, "mlflow_run_id": child or ""},
               [out_dir / "results.parquet", out_dir / "summary.json", last_ckpt])
    except BaseException:
        if rank0 and child:
            tracking.finish(uri, child, status="FAILED")
        raise
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def _trial_driver(config: dict, *, context: dict) -> None:
    """A Tune trial: one ``TorchTrainer`` fit whose results reach Tune through TuneReportCallback."""
    import ray.train
    from ray import tune
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trial = tune.get_context()
    trial_id = trial.get_trial_id()
    overrides = dict(config)
    method = overrides.pop("method", context["spec"]["method"])  # a study may compare methods
    spec = {**context["spec"], "method": method, "overrides": {**context["spec"]["overrides"], **overrides}}
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={**context["worker"], "spec": spec, "trial_id": trial_id,
                           "trial_name": f"trial_{trial_id}"},
        torch_config=TorchConfig(backend="nccl" if context["use_gpu"] else "gloo"),
        scaling_config=ScalingConfig(num_workers=context["num_workers"], use_gpu=context["use_gpu"],
                                     resources_per_worker={"CPU": context["cpus_per_worker"]}),
        # A deterministic name (the trial id) lets Train restore itself when a trial restarts.
        run_config=ray.train.RunConfig(name=f"train-{trial_id}", storage_path=context["storage_path"],
                                       callbacks=[TuneReportCallback()]),
    )
    trainer.fit()


def validate_study(spec: StudySpec) -> RunSpec:
    """Raise ValueError on a bad study before Ray or MLflow start."""
    if spec.num_samples < 1 or spec.max_concurrent < 1:
        raise ValueError("num_samples and max_concurrent must be >= 1")
    if spec.num_workers != 1:
        # Each worker would run the whole sequence on its own: data-parallel training is not wired yet.
        raise ValueError("num_workers must be 1 until multi-worker DDP training lands")
    run_spec = RunSpec(method=spec.method, dataset=spec.dataset, seed=spec.seed, overrides=dict(spec.fixed_overrides))
    resolve_run(run_spec)
    return run_spec


def run_study(spec: StudySpec) -> list[dict[str, Any]]:
    """Run the study; return one row per trial (its searched params and final metrics)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    run_spec = validate_study(spec)
    runs_dir = Path(spec.runs_dir).resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    uri = spec.resolved_tracking_uri()
    experiment_id = tracking.ensure_experiment(uri, spec.name, artifact_dir=runs_dir / "mlartifacts")
    parent = tracking.start_run(uri, experiment_id, f"{spec.name}-study",
                                tags={"study": spec.name, "method": spec.method, "dataset": spec.dataset})
    tracking.log_params(uri, parent, {"num_samples": spec.num_samples, "max_concurrent": spec.max_concurrent,
                                      "seed": spec.seed, "search_seed": spec.search_seed,
                                      "scheduler": spec.scheduler,
                                      **{f"fixed/{k}": v for k, v in spec.fixed_overrides.items()}})
    if spec.dataset == "digits":
        from promptcl.pretrain import digits_backbone_checkpoint

        digits_backbone_checkpoint()  # made once here, not raced for by concurrent trials

    ensure_ray()
    context = {
        "spec": {**dataclasses.asdict(run_spec)},
        "worker": {"tracking_uri": uri, "experiment_id": experiment_id, "parent_run_id": parent,
                   "progress": spec.progress},
        "storage_path": spec.resolved_storage_path(),
        "num_workers": spec.num_workers, "use_gpu": spec.use_gpu, "cpus_per_worker": spec.cpus_per_worker,
    }
    scheduler = (ASHAScheduler(time_attr="task", grace_period=1, reduction_factor=2)
                 if spec.scheduler == "asha" else FIFOScheduler())
    tuner = tune.Tuner(
        # The trial is only a driver; its Train worker holds the CPU (or GPU).
        tune.with_resources(tune.with_parameters(_trial_driver, context=context), {"CPU": 0.01}),
        tune_config=tune.TuneConfig(
            metric=spec.metric, mode="max", num_samples=spec.num_samples,
            max_concurrent_trials=spec.max_concurrent, scheduler=scheduler,
            search_alg=OptunaSearch(space=spec.search_space, metric=spec.metric, mode="max",
                                    seed=spec.search_seed,
                                    points_to_evaluate=[dict(p) for p in spec.baseline_points] or None),
        ),
        run_config=tune.RunConfig(name=spec.name, storage_path=spec.resolved_storage_path()),
    )
    try:
        grid = tuner.fit()
    except BaseException:
        tracking.finish(uri, parent, status="FAILED")
        raise
    # Completed trials only: one stopped early by a scheduler has no final metrics.
    rows = [{**result.config, **{k: v for k, v in result.metrics.items() if k in TRIAL_METRICS}}
            for result in grid
            if result.error is None and "final_average_accuracy" in (result.metrics or {})]
    errors = sum(result.error is not None for result in grid)
    _log_study_summary(uri, parent, rows)
    tracking.finish(uri, parent, status="FAILED" if errors else "FINISHED")
    return rows


TRIAL_METRICS = (*FINAL_METRICS, "task_identity_accuracy", "mlflow_run_id", "task", "trial_id")


def _log_study_summary(uri: str, parent: str, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not rows:
        return
    best = max(rows, key=lambda r: r["final_average_accuracy"])
    tracking.log_metrics(uri, parent, {"best_final_average_accuracy": best["final_average_accuracy"],
                                       "completed_trials": len(rows)})
    with tempfile.TemporaryDirectory() as tmp:
        pq.write_table(pa.Table.from_pylist(rows), Path(tmp) / "trials.parquet")
        tracking.client(uri).log_artifacts(parent, tmp)


def best_per(rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """The trial with the highest FA for each value of ``key``, sorted by that value."""
    best: dict[Any, dict[str, Any]] = {}
    for row in rows:
        value = row.get(key)
        if value not in best or row["final_average_accuracy"] > best[value]["final_average_accuracy"]:
            best[value] = row
    return [best[v] for v in sorted(best)]


def format_table(rows: list[dict[str, Any]], params: list[str]) -> str:
    """Accuracy vs parameters/FLOPs, one line per trial."""
    head = [*params, "FA", "CA", "FM", "trainable", "test MFLOPs/img"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        cells = ["-" if r.get(p) is None else f"{r[p]:.3g}" if isinstance(r[p], float) else str(r[p])
                 for p in params]
        cells += [f"{r['final_average_accuracy']:.2f}", f"{r['cumulative_average_accuracy']:.2f}",
                  f"{r['forgetting']:.2f}", f"{int(r['trainable_params']):,}",
                  f"{r['test_flops_per_image'] / 1e6:.2f}"]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def study_parser(description: str, *, name: str, num_samples: int):
    """The flags every study script shares."""
    import argparse

    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--num-samples", type=int, default=num_samples)
    p.add_argument("--max-concurrent", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="CL run seed (class order, init)")
    p.add_argument("--search-seed", type=int, default=0)
    p.add_argument("--runs-dir", type=Path, default=Path(os.environ.get("PROMPTCL_RUNS_DIR", "runs")))
    p.add_argument("--mlflow-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite in --runs-dir")
    p.add_argument("--storage-path", default=None, help="Ray results; shared storage on a cluster")
    p.add_argument("--progress", action="store_true", help="per-epoch progress bars in worker logs")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per trial's Train worker")
    p.add_argument("--asha", action="store_true", help="stop weak trials early at task boundaries")
    p.add_argument("--name", default=name)
    p.add_argument("--smoke", action="store_true", help="2 short trials (about a minute on 2 cores)")
    return p


def spec_from_args(args, *, method: str, search_space: SearchSpace, smoke_overrides: dict[str, Any],
                   baseline_points: tuple[dict[str, Any], ...] = ()) -> StudySpec:
    return StudySpec(
        baseline_points=baseline_points,
        name=args.name + ("_smoke" if args.smoke else ""), method=method, dataset=args.dataset,
        search_space=search_space, num_samples=2 if args.smoke else args.num_samples,
        max_concurrent=args.max_concurrent, seed=args.seed, search_seed=args.search_seed,
        fixed_overrides=smoke_overrides if args.smoke else {}, runs_dir=args.runs_dir,
        tracking_uri=args.mlflow_uri, storage_path=args.storage_path, use_gpu=args.use_gpu,
        progress=args.progress, scheduler="asha" if args.asha else "fifo",
    )


def run_study_script(spec: StudySpec, *, table_params: list[str], best_by: str, prog: str) -> int:
    """Validate, run, and print the best trials and the accuracy-vs-cost table of a study."""
    import sys

    try:
        validate_study(spec)
    except ValueError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    rows = run_study(spec)
    ranked = sorted(rows, key=lambda r: -r["final_average_accuracy"])
    print("\nBest trials:\n" + format_table(ranked[:5], table_params))
    print(f"\nBest trial per {best_by} (accuracy vs parameters and test FLOPs):\n"
          + format_table(best_per(rows, best_by), table_params))
    print(f"\nMLflow: {spec.resolved_tracking_uri()} (experiment {spec.name!r})")
    return 0 if rows else 1
