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


def resolve_run(spec: RunSpec) -> ResolvedRun:
    """Validate names, data, hyperparameters; raise ValueError with one clear line on bad input."""
    method_cls = get_method(spec.method)
    ds = dataset_spec(spec.dataset)
    backbone = spec.backbone or ds.default_backbone
    check_backbone_name(backbone)
    check_data_dir(spec.dataset, Path(spec.data_dir) if spec.data_dir else None)
    if spec.checkpoint_file is not None and not Path(spec.checkpoint_file).is_file():
        raise ValueError(f"checkpoint file {spec.checkpoint_file!r} does not exist")
    if spec.eval_batch_size < 1:
        raise ValueError(f"eval_batch_size must be >= 1, got {spec.eval_batch_size}")
    if spec.device not in ("auto", "cpu") and not spec.device.startswith("cuda"):
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {spec.device!r}")
    config = apply_overrides(method_cls.preset_for(spec.dataset), spec.overrides)
    # Build the method on a meta-device backbone: config/backbone mismatches surface now, for free.
    with torch.device("meta"):
        method_cls(config, backbone=build_backbone(backbone), num_classes=ds.num_classes)
    return ResolvedRun(spec, method_cls, config, backbone)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_method(run: ResolvedRun, num_classes: int, device: torch.device) -> PromptMethod:
    spec = run.spec
    vit = build_backbone(run.backbone, pretrained=spec.pretrained,
                         checkpoint_file=Path(spec.checkpoint_file) if spec.checkpoint_file else None)
    return run.method_cls(run.config, backbone=vit, num_classes=num_classes).to(device)


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
    scheduler = (torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: phase.lr_factor(it, total))
                 if phase.lr_factor else None)
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


@torch.no_grad()
def evaluate(method: PromptMethod, loader, device) -> tuple[float, int]:
    method.eval()
    correct = total = 0
    for images, labels in loader:
        pred = method.predict(images.to(device)).cpu()
        correct += int((pred == labels).sum())
        total += len(labels)
    return 100.0 * correct / max(total, 1), total


def run_sequence(
    run: ResolvedRun,
    out_dir: Path,
    *,
    on_task_end: Optional[Callable[[TaskReport], None]] = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Train and evaluate a whole CL sequence; write results.parquet, summary.json, checkpoints."""
    from promptcl.cost import measure_cost

    spec = run.spec
    started = time.perf_counter()
    out_dir = Path(out_dir)
    (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    device = pick_device(spec.device)
    data = load_dataset(spec.dataset, Path(spec.data_dir) if spec.data_dir else None)
    scenario = ClassIncremental(data, increments=spec.increment, seed=spec.seed)
    seed_everything(spec.seed)
    method = build_method(run, data.num_classes, device)
    batch_size = run.config.batch_size

    T = scenario.num_tasks
    acc = np.zeros((T, T))
    rows = []
    for t in range(T):
        task = TaskInfo(index=t, classes=scenario.task_classes(t), num_tasks=T)
        method.begin_task(task)
        loader = scenario.train_loader(t, batch_size=batch_size, seed=spec.seed)
        for phase in method.phases(task):
            train_phase(method, phase, task, loader, device, progress=progress)
        method.end_task(task, lambda: scenario.train_loader(t, batch_size=batch_size, seed=spec.seed,
                                                            shuffle=False))
        for i in range(t + 1):
            acc[t, i], n = evaluate(method, scenario.test_loader(i, batch_size=spec.eval_batch_size), device)
            rows.append({"train_task": t, "eval_task": i, "accuracy": acc[t, i], "n_samples": n})
        ckpt = out_dir / "checkpoints" / f"task_{t:02d}.pt"
        torch.save({"task": t, "seen_classes": method.seen_classes, "state": method.checkpoint_state(),
                    "accuracy": acc[: t + 1, : t + 1].copy(), "config": run.to_dict()}, ckpt)
        if on_task_end:
            on_task_end(TaskReport(t, T, acc[: t + 1, : t + 1].copy(), ckpt))

    write_results(out_dir / "results.parquet", rows)
    cost = measure_cost(run.method_cls, run.config, run.backbone, data.num_classes, data.image_shape)
    summary = {
        **metrics.summarize(acc),
        **cost,
        "wall_seconds": time.perf_counter() - started,
        "accuracy_matrix": acc.tolist(),
        "class_order": scenario.class_order,
        "config": run.to_dict(),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def write_results(path: Path, rows: list[dict]) -> None:
    schema = pa.schema([("train_task", pa.int32()), ("eval_task", pa.int32()),
                        ("accuracy", pa.float64()), ("n_samples", pa.int64())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
