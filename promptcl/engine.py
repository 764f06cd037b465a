"""The one training loop every method shares, and the resolved description of a run."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import inspect
import json
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import timm
import torch
from tqdm.auto import tqdm

from promptcl import metrics
from promptcl.distributed import all_reduce_sum, broadcast_from_main, is_main, sync_gradients, world
from promptcl.core.backbone import (LOCAL_BACKBONES, backbone_mean_std, build_backbone, cache_hub_weights,
                                    check_backbone, check_backbone_name, encode, input_shape)
from promptcl.core.pretrain import local_backbone, verified_shipped_checkpoint
from promptcl.config import apply_overrides, as_flat_dict
from promptcl.data import CLASS_ORDERS
from promptcl.data.benchmarks import (ClassIncremental, check_data_dir, dataset_spec, load_dataset,
                                      scenario_class_order, source_order)
from promptcl.data.paper import split_sha256
from promptcl.data.preprocessing import Preprocessing, resolve_preprocessing
from promptcl.methods import get_method
from promptcl.methods.base import Phase, PromptMethod, TaskInfo



# The scalar results of a run that trackers and studies report (summary.json has them all).
FINAL_METRICS = ("final_average_accuracy", "cumulative_average_accuracy", "forgetting", "forgetting_canonical",
                 "backward_transfer", "validation_final_average_accuracy", "validation_cumulative_average_accuracy",
                 "trainable_params", "total_params", "train_flops_per_image", "test_flops_per_image",
                 "backbone_flops_per_image", "train_flops_per_run", "wall_seconds", "num_workers",
                 "frozen_images_computed", "frozen_images_reused")


# reference behaviours that mix prompts across a batch or vote on them batch-wide
# switches that make a sample's prompts, or its training loss, depend on the rest of its batch
BATCH_DEPENDENT_SWITCHES = ("compat_reference_gather", "batchwise_prompt", "compat_batch_crossed_pull")


@dataclass(frozen=True, kw_only=True)
class RunSpec:
    """Everything that defines one CL run; ``resolve_run`` validates it before any work starts."""

    method: str
    dataset: str
    seed: int = 0
    class_order: str = "seeded"  # promptcl.data.benchmarks.CLASS_ORDERS: seeded shuffle, or the dataset's own
    backbone: Optional[str] = None  # None: the dataset's default
    pretrained: bool = True  # False: a random-init backbone (a control)
    checkpoint_file: Optional[str] = None
    data_dir: Optional[str] = None
    split_file: Optional[str] = None  # a train/test split for the datasets that take one (ImageNet-R)
    eval_batch_size: int = 256
    device: str = "auto"
    precision: str = "fp32"  # "bf16": autocast on the run's device for every forward pass
    increment: Optional[int] = None  # None: the dataset's default
    preset: Optional[str] = None  # None: the method's preset for the dataset (and backbone)
    # preprocessing of the benchmarks read from disk (promptcl.data.preprocessing); None: "reference"
    protocol: Optional[str] = None
    loader_workers: Optional[int] = None  # DataLoader worker processes; None: 4 for disk benchmarks, else 0
    compile_backbone: bool = False  # torch.compile the frozen backbone's un-prompted pass (queries, TII)
    # a seeded, stratified fraction of each class's training images held out and evaluated after every
    # task like the test sets (validation_* metrics): what a study can select on without the test set
    validation_fraction: float = 0.0
    overrides: dict[str, Any] = field(default_factory=dict)  # method hyperparameters


@dataclass(frozen=True)
class ResolvedRun:
    spec: RunSpec
    method_cls: type[PromptMethod]
    config: Any
    backbone: str
    num_tasks: int
    preprocessing: Optional[Preprocessing] = None  # None: an offline tensor benchmark (no pipeline)

    def to_dict(self) -> dict[str, Any]:
        spec = dataclasses.asdict(self.spec)
        spec.pop("overrides")
        spec["backbone"] = self.backbone
        spec["protocol"] = self.preprocessing.name if self.preprocessing else "native"
        if self.spec.split_file is not None:  # recorded with its content's hash: a path can be overwritten
            spec["split_file_sha256"] = split_sha256(Path(self.spec.split_file))
        resolved = {"run": spec, "method_config": dataclasses.asdict(self.config)}
        if self.preprocessing is not None:
            resolved["preprocessing"] = self.preprocessing.to_dict()
        return resolved

    def flat_params(self) -> dict[str, Any]:
        return as_flat_dict(self.to_dict())

    def batch_dependent_switches(self) -> list[str]:
        """The switches on in this run that make a sample's prompts (or training loss) depend on the rest
        of its batch."""
        inert = self._inert()
        return [k for k in BATCH_DEPENDENT_SWITCHES if getattr(self.config, k, False) is True and k not in inert]

    def _inert(self) -> tuple[str, ...]:
        """Switches this config sets that change nothing (a config declares them: ``inert_switches``)."""
        return self.config.inert_switches() if hasattr(self.config, "inert_switches") else ()

    def protocol_tags(self) -> dict[str, str]:
        """Tags marking reference-compatibility switches that make a run's protocol unfair
        (e.g. prompts gathered across samples of a batch, a batch-wide vote on the prompts)."""
        # a switch is on when true or, numeric (compat_schedule_iter_step), not 0
        inert = self._inert()
        on = {k: "true" if v is True else str(v) for k, v in dataclasses.asdict(self.config).items()
              if (k.startswith("compat_") or k in BATCH_DEPENDENT_SWITCHES) and type(v) in (bool, int) and v
              and k not in inert}
        tags = {f"compat/{k}": v for k, v in on.items()}
        if on:
            tags["unfair_protocol"] = "true"
        return tags


def resolve_run(spec: RunSpec) -> ResolvedRun:
    """Validate names, data, hyperparameters; raise ValueError with one clear line on bad input."""
    method_cls = get_method(spec.method)
    ds = dataset_spec(spec.dataset)
    if not 0 <= spec.seed < 2**32:  # numpy's and Python's seeding range
        raise ValueError(f"seed must be in [0, 2**32 - 1], got {spec.seed}")
    if spec.class_order not in CLASS_ORDERS:
        raise ValueError(f"unknown class order {spec.class_order!r}; choose one of {', '.join(CLASS_ORDERS)}")
    if not 0 <= spec.validation_fraction <= 0.5:
        raise ValueError(f"validation_fraction must be in [0, 0.5], got {spec.validation_fraction}")
    backbone = spec.backbone or method_cls.DEFAULT_BACKBONES.get(spec.dataset, ds.default_backbone)
    check_backbone_name(backbone)  # names first: a typo is reported before anything is read
    # disk benchmarks are shown at 224 px; an offline benchmark's tensors have its default backbone's shape
    shown_at = (3, 224, 224) if ds.has_pipeline else input_shape(ds.default_backbone)
    if input_shape(backbone) != shown_at:
        raise ValueError(f"backbone {backbone!r} takes {' x '.join(map(str, input_shape(backbone)))} inputs; "
                         f"{spec.dataset} images are {' x '.join(map(str, shown_at))}")
    check_data_dir(spec.dataset, spec.data_dir, spec.split_file)
    preprocessing = None
    if ds.has_pipeline:
        preprocessing = resolve_preprocessing(spec.protocol or "reference", code_base=method_cls.REFERENCE_CODE_BASE,
                                              backbone_mean_std=backbone_mean_std(backbone))
    elif spec.protocol is not None:
        raise ValueError(f"dataset {spec.dataset!r} is an offline tensor benchmark: it has no --protocol")
    if spec.loader_workers is not None and spec.loader_workers < 0:
        raise ValueError(f"loader_workers must be >= 0, got {spec.loader_workers}")
    if spec.checkpoint_file is not None and not Path(spec.checkpoint_file).is_file():
        state = "is not a file" if Path(spec.checkpoint_file).exists() else "does not exist"
        raise ValueError(f"checkpoint file {spec.checkpoint_file!r} {state}")
    if spec.eval_batch_size < 1:
        raise ValueError(f"eval_batch_size must be >= 1, got {spec.eval_batch_size}")
    if spec.device not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", spec.device):
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {spec.device!r}")
    if spec.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {spec.precision!r}")
    checkpoint_file = Path(spec.checkpoint_file) if spec.checkpoint_file else None
    # A corrupt, foreign or misfitting weights file, or a release-only backbone without one, fails now.
    check_backbone(backbone, checkpoint_file, spec.pretrained)
    if (checkpoint_file is None and spec.pretrained and backbone in LOCAL_BACKBONES
            and local_backbone(backbone).delivery == "shipped"):
        verified_shipped_checkpoint(backbone)
    num_tasks = _num_tasks(ds.num_classes, spec.increment, ds.default_increment)
    config = apply_overrides(method_cls.preset_for(spec.dataset, backbone, spec.preset, num_tasks), spec.overrides)
    if ds.domain_size is not None and spec.increment not in (None, ds.domain_size):
        raise ValueError(f"{spec.dataset} has one task per source: increment must be {ds.domain_size}")
    # Build the method on a meta-device backbone: config/backbone mismatches surface now, for free.
    with torch.device("meta"):
        vit = build_backbone(backbone)
        method_cls(config, backbone=vit, num_classes=ds.num_classes, num_tasks=num_tasks)
    return ResolvedRun(spec, method_cls, config, backbone, num_tasks, preprocessing)


def _num_tasks(num_classes: int, increment: Optional[int], default: int) -> int:
    increment = default if increment is None else increment
    if increment < 1:
        raise ValueError(f"increment must be >= 1, got {increment}")
    if num_classes % increment:
        raise ValueError(f"increment {increment} does not divide {num_classes} classes")
    return num_classes // increment


PRECISIONS = ("fp32", "bf16")
DISK_LOADER_WORKERS = 4  # the references' num_workers


def precision_context(device: torch.device, precision: str):
    """bf16 autocast on the run's device (CUDA or CPU), nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_local_resources(run: ResolvedRun, *, device: bool = True) -> None:
    """What the machine that runs ``run`` must have, checked before any work: its device (unless
    ``device`` is false: Ray places the workers) and the backbone's published hub weights in the
    local cache (fetched now if online). A driver attached to a Ray cluster checks neither: its
    workers may have GPUs and caches it lacks (each fetches before reading data: ``_set_up``)."""
    if device:
        check_device(run.spec.device)
    _cache_backbone_weights(run)


def _cache_backbone_weights(run: ResolvedRun) -> None:
    if run.spec.pretrained and run.spec.checkpoint_file is None:
        cache_hub_weights(run.backbone)


def check_device(name: str) -> None:
    """A clear error, before any work, when this process cannot use the device ``name`` (a run's
    own machine; a Ray driver leaves this to the workers, which may have GPUs it lacks)."""
    device = pick_device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: no CUDA device is available here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_method(run: ResolvedRun, num_classes: int, num_tasks: int, device: torch.device) -> PromptMethod:
    spec = run.spec
    vit = build_backbone(run.backbone, pretrained=spec.pretrained,
                         checkpoint_file=Path(spec.checkpoint_file) if spec.checkpoint_file else None)
    method = run.method_cls(run.config, backbone=vit, num_classes=num_classes, num_tasks=num_tasks).to(device)
    if spec.compile_backbone:  # the frozen pass has no prompts, so it compiles to one graph (batch size dynamic)
        method.frozen_encoder = torch.compile(functools.partial(encode, method.backbone), dynamic=True)
    return method


@dataclass
class TaskReport:
    """Handed to ``on_task_end`` after each task."""

    task: int
    num_tasks: int
    accuracy: np.ndarray  # accuracy matrix so far, [task + 1, task + 1]
    checkpoint: Optional[Path]  # None on ranks other than 0
    cost: dict[str, int]  # parameters and FLOPs per image (known before training)
    validation: Optional[np.ndarray] = None  # the same on the held-out training images, when the run has them


def train_phase(method: PromptMethod, phase: Phase, task: TaskInfo, loader, device, *,
                progress: bool, precision: str = "fp32") -> tuple[dict[str, float], int]:
    """``phase.epochs`` passes over ``loader``; in a process group each step's gradients are those
    of the whole global batch, so every rank takes the same optimizer steps. Returns the last
    step's logs and the number of training images this rank stepped on."""
    if phase.optimizer == "sgd":
        optimizer = torch.optim.SGD(phase.param_groups, momentum=phase.momentum, weight_decay=phase.weight_decay)
    else:
        optimizer = torch.optim.AdamW(phase.param_groups, weight_decay=phase.weight_decay)
    params = [p for g in phase.param_groups for p in g["params"]]
    steps_per_epoch = loader.batch_sampler.global_steps()
    total = phase.epochs * steps_per_epoch
    scheduler = None
    if phase.lr_factor is not None:
        factors = phase.lr_factor if isinstance(phase.lr_factor, list) else [phase.lr_factor] * len(phase.param_groups)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, [lambda it, f=f: f(it, total) for f in factors])

    def step(local_count: int) -> None:
        sync_gradients(params, local_count)
        if phase.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, phase.grad_clip)
        optimizer.step()
        if scheduler:
            scheduler.step()

    logs: dict[str, float] = {}
    images_seen = 0
    for epoch in range(phase.epochs):
        method.train()
        method.backbone.eval()  # frozen: no dropout or drop-path noise from the backbone
        bar = tqdm(loader, disable=not progress, leave=False,
                   desc=f"task {task.index} {phase.name} epoch {epoch + 1}/{phase.epochs}")
        steps = 0
        for images, labels in bar:
            with precision_context(device, precision):
                loss, logs = method.training_loss(images.to(device), labels.to(device), task, phase)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            step(len(labels))
            steps += 1
            images_seen += len(labels)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        for _ in range(steps_per_epoch - steps):  # this rank's share of the last batch was empty
            optimizer.zero_grad(set_to_none=True)
            step(0)
    if phase.on_finish is not None:
        phase.on_finish(optimizer)
    return logs, images_seen


@dataclass
class Evaluation:
    accuracy: float
    n_samples: int
    task_identity: Optional[float] = None  # % of samples whose inferred task is the true one


@torch.no_grad()
def evaluate(method: PromptMethod, loader, device, task_index: int, precision: str = "fp32") -> Evaluation:
    """Accuracy over ``loader``; in a process group the ranks' counts are summed, so N ranks on
    their shards give exactly the single-process accuracy (predictions are per sample)."""
    method.eval()
    correct = total = task_hits = 0
    has_task = False
    for images, labels in loader:
        with precision_context(device, precision):
            pred, details = method.predict_with_details(images.to(device))
        correct += int((pred.cpu() == labels).sum())
        total += len(labels)
        if "task" in details:
            has_task = True
            task_hits += int((details["task"].cpu() == task_index).sum())
    # has_task is summed too: a rank whose shard held no test batch cannot tell whether the method infers tasks
    counts = all_reduce_sum(torch.tensor([correct, total, task_hits, has_task], dtype=torch.int64, device=device))
    correct, total, task_hits, ranks_with_task = counts.tolist()
    if not total:
        raise ValueError(f"task {task_index} has no test images to evaluate")
    return Evaluation(100.0 * correct / total, total, 100.0 * task_hits / total if ranks_with_task else None)


# Task checkpoints hold tensors, numbers, strings, lists and dicts only, so they load with
# torch.load(weights_only=True): a checkpoint is data and cannot run code.
CHECKPOINT_KEYS = {"task", "seen_classes", "state", "matrices", "config", "rng"}


def _rng_state() -> dict[str, Any]:
    version, keys, position, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": [version, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached]}


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    version, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((version, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])


def _config_key(run: ResolvedRun) -> str:
    return json.dumps(run.to_dict(), sort_keys=True)


# Configuration fields added after checkpoints and summaries were first written, with the value that
# gives what the versions before them ran: a stored configuration without one is of the same run (for a
# method's field, where the run's method has it).
_ADDED_FIELDS = {("run", "class_order"): "seeded", ("run", "validation_fraction"): 0.0,
                 ("preprocessing", "cifar_carryover"): False,
                 ("method_config", "compat_schedule_iter_step"): 0,
                 ("method_config", "compat_first_step_at_base_lr"): False,
                 ("method_config", "compat_population_variance"): False,
                 ("method_config", "compat_reference_gram_schmidt"): False,
                 ("method_config", "vor_outliers"): True}


def same_configuration(stored: dict[str, Any], run: ResolvedRun) -> bool:
    """Whether a configuration a checkpoint or summary holds is ``run``'s (older ones included)."""
    current = json.loads(_config_key(run))
    stored = {section: dict(fields) if isinstance(fields, dict) else fields for section, fields in stored.items()}
    for (section, name), value in _ADDED_FIELDS.items():
        if isinstance(stored.get(section), dict) and name in current.get(section, {}):
            stored[section].setdefault(name, value)
    return stored == current


def save_task_checkpoint(path: Path, *, task: int, method: PromptMethod, run: ResolvedRun,
                         matrices: dict[str, np.ndarray], work: Optional[dict[str, Any]] = None) -> None:
    torch.save({"task": task, "seen_classes": method.seen_classes, "state": method.checkpoint_state(),
                "matrices": {k: torch.from_numpy(m[: task + 1, : task + 1].copy()) for k, m in matrices.items()},
                "rng": _rng_state(), "config": _config_key(run), "work": work}, path)


def load_task_checkpoint(path: Path) -> dict[str, Any]:
    """A per-task checkpoint written by :func:`run_sequence`; a clear error if it is damaged,
    foreign or holds anything but data."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or not CHECKPOINT_KEYS <= set(ckpt):
            raise KeyError("missing entries")
    except Exception as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"checkpoint {str(path)!r} is corrupt or not a promptcl task checkpoint: "
                         f"{first_line}") from err
    ckpt["matrices"] = {k: m.numpy() for k, m in ckpt["matrices"].items()}
    return ckpt


@dataclass
class _Setup:
    device: torch.device
    scenario: ClassIncremental
    method: PromptMethod
    num_classes: int
    image_shape: tuple[int, int, int]


def _set_up(run: ResolvedRun) -> _Setup:
    """Device, tasks and a freshly initialised method for ``run`` (seeded)."""
    spec = run.spec
    device = pick_device(spec.device)
    _cache_backbone_weights(run)  # an unreachable hub fails before the data is read
    class_order = scenario_class_order(spec.dataset, spec.seed, spec.class_order)
    data = load_dataset(spec.dataset, spec.data_dir, run.preprocessing, spec.split_file,
                        sources_learned=source_order(spec.dataset, class_order))
    ds = dataset_spec(spec.dataset)
    workers = spec.loader_workers
    if workers is None:
        workers = DISK_LOADER_WORKERS if ds.has_pipeline else 0
    scenario = ClassIncremental(data, increments=ds.num_classes // run.num_tasks,
                                class_order=class_order, num_workers=workers,
                                pin_memory=device.type == "cuda",
                                drop_last=run.preprocessing is not None and run.preprocessing.drop_last,
                                validation_fraction=spec.validation_fraction, validation_seed=spec.seed)
    seed_everything(spec.seed)
    method = build_method(run, data.num_classes, scenario.num_tasks, device)
    return _Setup(device, scenario, method, data.num_classes, data.image_shape)


def _load_for(run: ResolvedRun, path: Path) -> dict[str, Any]:
    ckpt = load_task_checkpoint(path)
    if not same_configuration(json.loads(ckpt["config"]), run):
        raise ValueError(f"checkpoint {str(path)!r} belongs to a different run configuration")
    return ckpt


def evaluate_checkpoint(run: ResolvedRun, checkpoint: Path) -> np.ndarray:
    """Accuracy (%) on every task the model in ``checkpoint`` has seen. In a process group the
    test sets are sharded across ranks and the counts summed: the result is exactly the
    single-process one."""
    ckpt = _load_for(run, checkpoint)
    setup = _set_up(run)
    setup.method.load_checkpoint_state(ckpt["state"], ckpt["seen_classes"])
    return np.array([
        evaluate(setup.method, setup.scenario.test_loader(i, batch_size=run.spec.eval_batch_size),
                 setup.device, i, run.spec.precision).accuracy
        for i in range(ckpt["task"] + 1)])


def run_sequence(
    run: ResolvedRun,
    out_dir: Path,
    *,
    on_task_end: Optional[Callable[[TaskReport], None]] = None,
    progress: bool = False,
    resume_from: Optional[Path] = None,
    feature_cache: Optional[str] = None,
) -> dict[str, Any]:
    """Train and evaluate a whole CL sequence; write results.parquet, summary.json, checkpoints.

    ``feature_cache`` (a directory or URI): a :class:`~promptcl.core.feature_store.FeatureStore`
    root shared by the runs of a study, so un-prompted backbone passes are made once per image.

    ``resume_from`` (a ``task_XX.pt`` of the same run config) continues after that task with the
    model, statistics, accuracy matrices and RNG state it holds, so the result equals an
    uninterrupted run. In a process group (Ray Train workers) every rank trains on its shard of
    each global batch and holds the same state; rank 0 alone writes files and checkpoints
    (``TaskReport.checkpoint`` is None on the other ranks).
    """
    from promptcl.cost import measure_cost, train_flops_per_run

    spec = run.spec
    started = time.perf_counter()
    resumed = _load_for(run, resume_from) if resume_from is not None else None
    main_rank = is_main()
    out_dir = Path(out_dir)
    if main_rank:
        (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    setup = _set_up(run)
    device, scenario, method = setup.device, setup.scenario, setup.method
    T = scenario.num_tasks
    batch_size = run.config.batch_size
    rng = _rng_state()  # costs are measured on a fresh copy: leave the run's generators (all three) alone
    try:
        cost = measure_cost(run.method_cls, run.config, run.backbone, setup.num_classes, setup.image_shape,
                            num_tasks=T)
    finally:
        _set_rng_state(rng)
    method.pass_autocast = lambda: precision_context(device, spec.precision)
    store = _feature_store(feature_cache, run, method, device) if feature_cache else None
    method.feature_store = store

    matrices: dict[str, np.ndarray] = {"accuracy": np.zeros((T, T))}
    # the training work done so far, for train_flops_per_run (None: resumed from a checkpoint without it)
    work: Optional[dict[str, Any]] = {"phase_images": {}, "frozen_pass_images": 0, "prompted_pass_images": 0}
    first_task = 0
    if resumed is not None:
        work = resumed.get("work")
        method.load_checkpoint_state(resumed["state"], resumed["seen_classes"])
        for name, m in resumed["matrices"].items():
            matrices[name] = np.zeros((T, T))
            matrices[name][: m.shape[0], : m.shape[1]] = m
        _set_rng_state(resumed["rng"])
        first_task = resumed["task"] + 1

    def evaluate_seen(t: int, name: str) -> None:
        loader = scenario.validation_loader if name == "validation" else scenario.test_loader
        for i in range(t + 1):
            result = evaluate(method, loader(i, batch_size=spec.eval_batch_size), device, i, spec.precision)
            matrices.setdefault(name, np.zeros((T, T)))[t, i] = result.accuracy
            if name == "accuracy" and result.task_identity is not None:
                matrices.setdefault("task_identity", np.zeros((T, T)))[t, i] = result.task_identity

    method.training_augmented = scenario.data.train_augmented is not None
    for t in range(first_task, T):
        task = TaskInfo(index=t, classes=scenario.task_classes(t), num_tasks=T)
        if store is not None:
            store.refresh()  # what concurrent runs have stored meanwhile
        method.begin_task(task)
        loader = scenario.train_loader(t, batch_size=batch_size, seed=spec.seed,
                                       cumulative=method.TRAINS_ON_SEEN_TASKS)
        # Augmented images never repeat: their frozen features are computed, not stored.
        method.feature_store = None if method.training_augmented else store
        phase_images: dict[str, int] = {}
        for phase in method.phases(task):
            _, images = train_phase(method, phase, task, loader, device, progress=progress, precision=spec.precision)
            phase_images[phase.name] = phase_images.get(phase.name, 0) + images
        method.feature_store = store
        passes_before = dict(method.end_of_task_pass_images)
        # Not under autocast: its backbone passes take the run's precision (collect_features), its fits fp32.
        method.end_task(task, lambda augmented=False: scenario.train_loader(
                            t, batch_size=batch_size, seed=spec.seed, shuffle=False, augmented=augmented),
                        lambda name: evaluate_seen(t, name))
        passes = {kind: method.end_of_task_pass_images[kind] - passes_before[kind] for kind in passes_before}
        if work is not None:
            _add_work(work, phase_images, passes, device)
        broadcast_from_main(method.checkpoint_state().values())
        evaluate_seen(t, "accuracy")
        if spec.validation_fraction:
            evaluate_seen(t, "validation")
        if store is not None:
            store.flush()
        ckpt = out_dir / "checkpoints" / f"task_{t:02d}.pt" if main_rank else None
        if ckpt is not None:
            save_task_checkpoint(ckpt, task=t, method=method, run=run, matrices=matrices, work=work)
        if on_task_end:
            validation = matrices["validation"][: t + 1, : t + 1].copy() if "validation" in matrices else None
            on_task_end(TaskReport(t, T, matrices["accuracy"][: t + 1, : t + 1].copy(), ckpt, cost, validation))

    acc = matrices["accuracy"]
    # un-prompted backbone passes, per image: made by this run, and read from the feature store
    # (each rank passed its shard: summed over the ranks)
    frozen = all_reduce_sum(torch.tensor([(store.computed if store is not None else 0) + method.frozen_images_computed,
                                          store.reused if store is not None else 0], dtype=torch.float64,
                                         device=device))
    summary = {
        **metrics.summarize(acc),
        **cost,
        "wall_seconds": time.perf_counter() - started,
        "num_workers": world()[1],
        "frozen_images_computed": int(frozen[0]), "frozen_images_reused": int(frozen[1]),
        "accuracy_matrix": acc.tolist(),
        "method_state": method.report_state(),
        "class_order": scenario.class_order,
        "config": run.to_dict(),
    }
    if work is not None:
        summary["train_flops_per_run"] = train_flops_per_run(cost, work)
        summary["training_work"] = work
    if "task_identity" in matrices:
        summary["task_identity_accuracy"] = float(matrices["task_identity"][-1].mean())
    if "validation" in matrices:
        summary.update({f"validation_{k}": v for k, v in metrics.summarize(matrices["validation"]).items()})
    for name, m in matrices.items():
        if name != "accuracy":
            summary[f"{name}_matrix"] = m.tolist()
    if main_rank:
        rows = [{"train_task": t, "eval_task": i, "accuracy": acc[t, i],
                 "n_samples": len(scenario.test_dataset(i))} for t in range(T) for i in range(t + 1)]
        write_results(out_dir / "results.parquet", rows)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _add_work(work: dict[str, Any], phase_images: dict[str, int], passes: dict[str, int],
              device: torch.device) -> None:
    """Add one task's work: this rank's images per training phase and per kind of end-of-task pass,
    summed over the ranks (each stepped on and passed its shard)."""
    phases, kinds = sorted(phase_images), sorted(passes)
    local = [phase_images[n] for n in phases] + [passes[k] for k in kinds]
    totals = [int(v) for v in all_reduce_sum(torch.tensor(local, dtype=torch.float64, device=device)).tolist()]
    for name, total in zip(phases, totals):
        work["phase_images"][name] = work["phase_images"].get(name, 0) + total
    for kind, total in zip(kinds, totals[len(phases):]):
        work[f"{kind}_pass_images"] += total


def _feature_store(root: str, run: ResolvedRun, method: PromptMethod, device: torch.device):
    """The store of this run's frozen features: everything that determines them but the image."""
    from promptcl.core.feature_store import FeatureStore, weights_digest

    compiled = {"compiled": True} if run.spec.compile_backbone else {}  # compiled features differ in the last bits
    # another GPU model or TF32 setting gives other last bits; so can another matmul precision anywhere
    # and on a CPU, the instruction set its kernels dispatch to (nodes of a cluster may differ)
    hardware = ({"gpu": torch.cuda.get_device_name(device),
                 "tf32": [torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32]}
                if device.type == "cuda" else {"cpu_capability": torch.backends.cpu.get_cpu_capability()})
    return FeatureStore(root, {"backbone": run.backbone, "weights": weights_digest(method.backbone),
                               "precision": run.spec.precision, "device": device.type,
                               "matmul_precision": torch.get_float32_matmul_precision(),
                               "torch": torch.__version__.split("+")[0], "timm": timm.__version__,
                               "code": _frozen_pass_code_digest(), **hardware, **compiled})


@functools.cache
def _frozen_pass_code_digest() -> str:
    """A digest of the source that computes a frozen feature (``encode`` and the blocks it runs): an
    edit to it opens a new store rather than serving features the old code computed."""
    from promptcl.core import attention, backbone

    return hashlib.blake2b("".join(inspect.getsource(m) for m in (backbone, attention)).encode(),
                           digest_size=8).hexdigest()


def write_results(path: Path, rows: list[dict]) -> None:
    schema = pa.schema([("train_task", pa.int32()), ("eval_task", pa.int32()),
                        ("accuracy", pa.float64()), ("n_samples", pa.int64())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
