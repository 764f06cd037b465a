"""The one training loop every method shares, and the resolved description of a run."""

from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from promptcl import metrics
from promptcl.backbone import build_backbone, check_backbone_name
from promptcl.config import apply_overrides, as_flat_dict
from promptcl.data import ClassIncremental, check_data_dir, dataset_spec, load_dataset
from promptcl.methods import get_method
from promptcl.methods.base import Phase, PromptMethod, TaskInfo



# The scalar results of a run that trackers and studies report (summary.json has them all).
FINAL_METRICS = ("final_average_accuracy", "cumulative_average_accuracy", "forgetting", "backward_transfer",
                 "trainable_params", "total_params", "train_flops_per_image", "test_flops_per_image",
                 "backbone_flops_per_image", "wall_seconds")


@dataclass(frozen=True, kw_only=True)
class RunSpec:
    """Everything that defines one CL run; ``resolve_run`` validates it before any work starts."""

    method: str
    dataset: str
    seed: int = 0
    backbone: Optional[str] = None  # None: the dataset's default
    pretrained: bool = True  # False: a random-init backbone (a control)
    checkpoint_file: Optional[str] = None
    data_dir: Optional[str] = None
    eval_batch_size: int = 256
    device: str = "auto"
    increment: Optional[int] = None  # None: the dataset's default
    preset: Optional[str] = None  # None: the method's preset for the dataset (and backbone)
    overrides: dict[str, Any] = field(default_factory=dict)  # method hyperparameters


@dataclass(frozen=True)
class ResolvedRun:
    spec: RunSpec
    method_cls: type[PromptMethod]
    config: Any
    backbone: str

    def to_dict(self) -> dict[str, Any]:
        spec = dataclasses.asdict(self.spec)
        spec.pop("overrides")
        spec["backbone"] = self.backbone
        return {"run": spec, "method_config": dataclasses.asdict(self.config)}

    def flat_params(self) -> dict[str, Any]:
        return as_flat_dict(self.to_dict())

    def protocol_tags(self) -> dict[str, str]:
        """Tags marking reference-compatibility switches that make a run's protocol unfair
        (e.g. prompts gathered across samples of a batch)."""
        on = [k for k, v in dataclasses.asdict(self.config).items() if k.startswith("compat_") and v is True]
        tags = {f"compat/{k}": "true" for k in on}
        if on:
            tags["unfair_protocol"] = "true"
        return tags


def resolve_run(spec: RunSpec) -> ResolvedRun:
    """Validate names, data, hyperparameters; raise ValueError with one clear line on bad input."""
    method_cls = get_method(spec.method)
    ds = dataset_spec(spec.dataset)
    backbone = spec.backbone or method_cls.DEFAULT_BACKBONES.get(spec.dataset, ds.default_backbone)
    check_backbone_name(backbone)
    check_data_dir(spec.dataset, Path(spec.data_dir) if spec.data_dir else None)
    if spec.checkpoint_file is not None and not Path(spec.checkpoint_file).is_file():
        raise ValueError(f"checkpoint file {spec.checkpoint_file!r} does not exist")
    if spec.eval_batch_size < 1:
        raise ValueError(f"eval_batch_size must be >= 1, got {spec.eval_batch_size}")
    if spec.device not in ("auto", "cpu") and not spec.device.startswith("cuda"):
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {spec.device!r}")
    config = apply_overrides(method_cls.preset_for(spec.dataset, backbone, spec.preset), spec.overrides)
    num_tasks = _num_tasks(ds.num_classes, spec.increment, ds.default_increment)
    # Build the method on a meta-device backbone: config/backbone mismatches surface now, for free.
    with torch.device("meta"):
        method_cls(config, backbone=build_backbone(backbone), num_classes=ds.num_classes, num_tasks=num_tasks)
    return ResolvedRun(spec, method_cls, config, backbone)


def _num_tasks(num_classes: int, increment: Optional[int], default: int) -> int:
    increment = increment or default
    if increment < 1 or num_classes % increment:
        raise ValueError(f"increment {increment} does not divide {num_classes} classes")
    return num_classes // increment


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_method(run: ResolvedRun, num_classes: int, num_tasks: int, device: torch.device) -> PromptMethod:
    spec = run.spec
    vit = build_backbone(run.backbone, pretrained=spec.pretrained,
                         checkpoint_file=Path(spec.checkpoint_file) if spec.checkpoint_file else None)
    return run.method_cls(run.config, backbone=vit, num_classes=num_classes, num_tasks=num_tasks).to(device)


@dataclass
class TaskReport:
    """Handed to ``on_task_end`` after each task."""

    task: int
    num_tasks: int
    accuracy: np.ndarray  # accuracy matrix so far, [task + 1, task + 1]
    checkpoint: Path


def train_phase(method: PromptMethod, phase: Phase, task: TaskInfo, loader, device, *,
                progress: bool) -> dict[str, float]:
    optimizer = torch.optim.AdamW(phase.param_groups, weight_decay=phase.weight_decay)
    total = phase.epochs * len(loader)
    scheduler = None
    if phase.lr_factor is not None:
        factors = phase.lr_factor if isinstance(phase.lr_factor, list) else [phase.lr_factor] * len(phase.param_groups)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, [lambda it, f=f: f(it, total) for f in factors])
    logs: dict[str, float] = {}
    for epoch in range(phase.epochs):
        method.train()
        method.backbone.eval()  # frozen: no dropout or drop-path noise from the backbone
        bar = tqdm(loader, disable=not progress, leave=False,
                   desc=f"task {task.index} {phase.name} epoch {epoch + 1}/{phase.epochs}")
        for images, labels in bar:
            loss, logs = method.training_loss(images.to(device), labels.to(device), task, phase)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if phase.grad_clip:
                torch.nn.utils.clip_grad_norm_([p for g in phase.param_groups for p in g["params"]],
                                               phase.grad_clip)
            optimizer.step()
            if scheduler:
                scheduler.step()
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return logs


@dataclass
class Evaluation:
    accuracy: float
    n_samples: int
    task_identity: Optional[float] = None  # % of samples whose inferred task is the true one


@torch.no_grad()
def evaluate(method: PromptMethod, loader, device, task_index: int) -> Evaluation:
    method.eval()
    correct = total = task_hits = 0
    has_task = False
    for images, labels in loader:
        pred, details = method.predict_with_details(images.to(device))
        correct += int((pred.cpu() == labels).sum())
        total += len(labels)
        if "task" in details:
            has_task = True
            task_hits += int((details["task"].cpu() == task_index).sum())
    n = max(total, 1)
    return Evaluation(100.0 * correct / n, total, 100.0 * task_hits / n if has_task else None)


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def load_task_checkpoint(path: Path) -> dict[str, Any]:
    """A per-task checkpoint written by :func:`run_sequence`; a clear error if it is damaged."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        if not {"task", "state", "matrices", "config", "rng"} <= set(ckpt):
            raise KeyError("missing entries")
    except Exception as err:
        raise ValueError(f"checkpoint {str(path)!r} is corrupt or not a promptcl task checkpoint: {err}") from err
    return ckpt


def run_sequence(
    run: ResolvedRun,
    out_dir: Path,
    *,
    on_task_end: Optional[Callable[[TaskReport], None]] = None,
    progress: bool = False,
    resume_from: Optional[Path] = None,
) -> dict[str, Any]:
    """Train and evaluate a whole CL sequence; write results.parquet, summary.json, checkpoints.

    ``resume_from`` (a ``task_XX.pt`` of the same run config) continues after that task with the
    model, statistics, accuracy matrices and RNG state it holds, so the result equals an
    uninterrupted run.
    """
    from promptcl.cost import measure_cost

    spec = run.spec
    started = time.perf_counter()
    resumed = load_task_checkpoint(resume_from) if resume_from is not None else None
    if resumed is not None and resumed["config"] != run.to_dict():
        raise ValueError(f"checkpoint {str(resume_from)!r} belongs to a different run configuration")
    out_dir = Path(out_dir)
    (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    device = pick_device(spec.device)
    data = load_dataset(spec.dataset, Path(spec.data_dir) if spec.data_dir else None)
    increment = spec.increment or dataset_spec(spec.dataset).default_increment
    scenario = ClassIncremental(data, increments=increment, seed=spec.seed)
    seed_everything(spec.seed)
    T = scenario.num_tasks
    method = build_method(run, data.num_classes, T, device)
    batch_size = run.config.batch_size

    matrices: dict[str, np.ndarray] = {"accuracy": np.zeros((T, T))}
    first_task = 0
    if resumed is not None:
        method.load_checkpoint_state(resumed["state"], resumed["seen_classes"])
        for name, m in resumed["matrices"].items():
            matrices[name] = np.zeros((T, T))
            matrices[name][: m.shape[0], : m.shape[1]] = m
        _set_rng_state(resumed["rng"])
        first_task = resumed["task"] + 1

    def evaluate_seen(t: int, name: str) -> None:
        for i in range(t + 1):
            result = evaluate(method, scenario.test_loader(i, batch_size=spec.eval_batch_size), device, i)
            matrices.setdefault(name, np.zeros((T, T)))[t, i] = result.accuracy
            if name == "accuracy" and result.task_identity is not None:
                matrices.setdefault("task_identity", np.zeros((T, T)))[t, i] = result.task_identity

    for t in range(first_task, T):
        task = TaskInfo(index=t, classes=scenario.task_classes(t), num_tasks=T)
        method.begin_task(task)
        loader = scenario.train_loader(t, batch_size=batch_size, seed=spec.seed)
        for phase in method.phases(task):
            train_phase(method, phase, task, loader, device, progress=progress)
        method.end_task(task, lambda: scenario.train_loader(t, batch_size=batch_size, seed=spec.seed,
                                                            shuffle=False),
                        lambda name: evaluate_seen(t, name))
        evaluate_seen(t, "accuracy")
        ckpt = out_dir / "checkpoints" / f"task_{t:02d}.pt"
        torch.save({"task": t, "seen_classes": method.seen_classes, "state": method.checkpoint_state(),
                    "matrices": {k: m[: t + 1, : t + 1].copy() for k, m in matrices.items()},
                    "rng": _rng_state(), "config": run.to_dict()}, ckpt)
        if on_task_end:
            on_task_end(TaskReport(t, T, matrices["accuracy"][: t + 1, : t + 1].copy(), ckpt))

    acc = matrices["accuracy"]
    rows = [{"train_task": t, "eval_task": i, "accuracy": acc[t, i],
             "n_samples": len(scenario.test_dataset(i))} for t in range(T) for i in range(t + 1)]
    write_results(out_dir / "results.parquet", rows)
    cost = measure_cost(run.method_cls, run.config, run.backbone, data.num_classes, data.image_shape,
                        num_tasks=T)
    summary = {
        **metrics.summarize(acc),
        **cost,
        "wall_seconds": time.perf_counter() - started,
        "accuracy_matrix": acc.tolist(),
        "class_order": scenario.class_order,
        "config": run.to_dict(),
    }
    if "task_identity" in matrices:
        summary["task_identity_accuracy"] = float(matrices["task_identity"][-1].mean())
    for name, m in matrices.items():
        if name != "accuracy":
            summary[f"{name}_matrix"] = m.tolist()
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def write_results(path: Path, rows: list[dict]) -> None:
    schema = pa.schema([("train_task", pa.int32()), ("eval_task", pa.int32()),
                        ("accuracy", pa.float64()), ("n_samples", pa.int64())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
