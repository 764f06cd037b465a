"""The contract every CL method implements; the shared loop in :mod:`promptcl.engine` drives it.

A method declares its prompts and head (``__init__``), what it trains in each phase of a task
(``phases``), its loss (``training_loss``), its after-task work (``end_task``) and how it predicts
(``logits``). The engine owns optimizers, schedules, evaluation, checkpoints and reporting.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, ClassVar, ContextManager, Iterable, Literal, Optional

import torch
from torch import nn

from promptcl.config import require
from promptcl.core.backbone import attention_geometry, backbone_family, classifier_norm_layer, encode
from promptcl.core.feature_store import FeatureStore


@dataclass(frozen=True)
class TaskInfo:
    index: int
    classes: range  # head outputs owned by this task
    num_tasks: int

    @property
    def num_seen(self) -> int:
        """Head outputs seen up to and including this task."""
        return self.classes.stop


@dataclass
class Phase:
    """One optimisation phase of a task: a fresh optimizer over ``param_groups`` for ``epochs``."""

    name: str
    epochs: int
    param_groups: list[dict]
    weight_decay: float = 0.0
    # (iteration, total iterations) -> multiplier of the base learning rate: one for all groups,
    # or a list with one per group
    lr_factor: Optional[Callable[[int, int], float] | list[Callable[[int, int], float]]] = None
    grad_clip: Optional[float] = None
    optimizer: Literal["adamw", "sgd"] = "adamw"  # AdamW with weight_decay=0 is Adam
    momentum: float = 0.9  # SGD only
    # Handed the phase's optimizer when its epochs are done, for after-task training that continues
    # it (OVOR's outlier epochs keep the Adam moments, as its code's one optimizer does)
    on_finish: Optional[Callable[[torch.optim.Optimizer], None]] = None


def hold_then_cosine(hold_iters: int, floor: float) -> Callable[[int, int], float]:
    """Multiplier held at ``floor`` for ``hold_iters`` iterations, then cosine from 1 to ``floor``."""

    def factor(it: int, total: int) -> float:
        if it < hold_iters:
            return floor
        span = max(1, total - hold_iters)
        progress = min(1.0, (it - hold_iters) / span)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def coda_cosine(epochs: int) -> Callable[[int, int], float]:
    """CODA-Prompt's per-epoch schedule (also OVOR's, and SMoPE's on CUB-200):
    ``cos(99 pi e / (200 (E - 1)))`` at epoch e, from 1 down to about 0.016."""
    return per_epoch(lambda e, n: math.cos(99 * math.pi * e / (200 * max(n - 1, 1))), epochs)


def per_epoch(factor: Callable[[int, int], float], epochs: int) -> Callable[[int, int], float]:
    """Turn an (epoch, epochs) schedule into an (iteration, total) one, constant within an epoch."""
    return lambda it, total: factor(it * epochs // max(total, 1), epochs)


def timm_linear_init(*modules: nn.Module) -> None:
    """timm's ViT init of every Linear layer in ``modules`` (truncated normal, std 0.02, zero bias):
    how the dualprompt-pytorch lineage (L2P, DualPrompt, HiDe, NoRGa) starts its new heads, where
    PyTorch's default would be Kaiming-uniform with a non-zero bias."""
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)


class ClassifierHead(nn.Linear):
    """A linear classifier, after a trainable norm where the backbone hands one over (MoCo v3 as the
    NoRGa/HiDe code builds it: an LN on the raw [CLS] that trains with the head, in every phase and
    replay alignment that trains the head). Its weight and bias are the Linear's own."""

    def __init__(self, in_features: int, out_features: int, norm: Optional[nn.Module] = None) -> None:
        super().__init__(in_features, out_features)
        self.norm = norm if norm is not None else nn.Identity()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return super().forward(self.norm(features))


def mask_logits(logits: torch.Tensor, allowed: range) -> torch.Tensor:
    """Set every logit outside ``allowed`` to -inf."""
    mask = torch.full_like(logits, float("-inf"))
    mask[:, allowed.start:allowed.stop] = 0.0
    return logits + mask


class PromptMethod(nn.Module):
    """Base class of CL methods on a frozen prompted ViT."""

    NAME: ClassVar[str]
    Config: ClassVar[type]
    PRESETS: ClassVar[dict[str, object]]
    # dataset name -> backbone the reference uses for it (else the dataset's default)
    DEFAULT_BACKBONES: ClassVar[dict[str, str]] = {}
    # full backbone passes per test image (two for methods with a task-identity pass)
    TEST_PASSES: ClassVar[int] = 1
    # its predictions come with each sample's inferred task (``predict_with_details``'s "task"), so a
    # run reports task-identity accuracy
    INFERS_TASK: ClassVar[bool] = False
    # True: task t trains on the data of tasks 0..t (the joint upper bound), not on task t alone
    TRAINS_ON_SEEN_TASKS: ClassVar[bool] = False
    # the code base whose input pipeline `--protocol reference` follows: "hide" (HiDe/NoRGa and the
    # baselines of their tables), "coda" (CODA/VQ-Prompt/SMoPE), "ovor", None (the common protocol)
    REFERENCE_CODE_BASE: ClassVar[Optional[str]] = None
    # (dataset, backbone family) -> what that pair's reference script sets beyond the dataset's preset
    SCRIPTS: ClassVar[dict[tuple[str, str], dict]] = {}
    # the presets SCRIPTS applies to (the scripts' own configs); None: every preset but ``small``
    SCRIPTED_PRESETS: ClassVar[Optional[tuple[str, ...]]] = None

    def __init__(self, config, *, backbone: nn.Module, num_classes: int, num_tasks: int) -> None:
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.num_classes = num_classes
        self.num_tasks = num_tasks
        self.depth, self.num_heads, self.head_dim = attention_geometry(backbone)
        self.embed_dim = backbone.num_features
        self.seen_classes = 0
        self.feature_store: Optional[FeatureStore] = None  # attached by the engine for a study-wide cache
        self.training_augmented = False  # set by the engine: the benchmark's training pipeline augments
        self.pass_autocast: Callable[[], ContextManager] = contextlib.nullcontext  # set by the engine
        self.frozen_images_computed = 0  # un-prompted passes made without a store (per image)
        self.frozen_images_requested = 0  # every image asked of frozen_features, stored or not
        self.end_of_task_pass_images = {"frozen": 0, "prompted": 0}  # collect_features' passes (work)
        # the un-prompted pass itself; the engine may swap in a torch.compile'd one
        self.frozen_encoder: Callable[[torch.Tensor], torch.Tensor] = lambda x: encode(self.backbone, x)
        self.validate_for_backbone()

    def classifier(self, num_outputs: int) -> ClassifierHead:
        """A new head on the backbone's features (with the norm the backbone hands over, if any)."""
        return ClassifierHead(self.embed_dim, num_outputs, self.classifier_norm())

    def classifier_norm(self) -> Optional[nn.Module]:
        """A fresh norm for a classifier on the backbone's features where the backbone hands one over, else None."""
        norm_layer = classifier_norm_layer(self.backbone)
        return norm_layer() if norm_layer else None

    @classmethod
    def preset_for(cls, dataset: Optional[str], backbone: Optional[str] = None, preset: Optional[str] = None,
                   num_tasks: Optional[int] = None):
        """The config a run starts from (before --set): the preset (see :meth:`preset_name`) with what the
        reference script for (dataset, backbone family) sets beyond it (``SCRIPTS``; not for ``small``,
        which is no script's)."""
        name = cls.preset_name(dataset, preset, num_tasks)
        family = backbone_family(backbone or "") or ""
        settings = cls.scripts_for(name).get((dataset or "", family), {})
        return dataclasses.replace(cls.PRESETS[name], **settings)

    @classmethod
    def scripts_for(cls, preset: str) -> dict[tuple[str, str], dict]:
        """The (dataset, backbone family) table that applies on top of ``preset``: ``SCRIPTS`` for the
        presets in ``SCRIPTED_PRESETS`` (by default every one but ``small``, which is no script's); a
        method whose presets come from several code bases picks per preset."""
        scripted = preset != "small" if cls.SCRIPTED_PRESETS is None else preset in cls.SCRIPTED_PRESETS
        return cls.SCRIPTS if scripted else {}

    @classmethod
    def preset_name(cls, dataset: Optional[str], preset: Optional[str] = None, num_tasks: Optional[int] = None) -> str:
        """An explicit preset, else the benchmark's (``small`` offline, ``imagenet-r``, ``cub200``,
        ``5datasets``) when the method has it, else ``paper``; specialised to the task count when a
        ``<name>-<T>tasks`` preset exists."""
        from promptcl.data.benchmarks import DATASETS

        if preset is not None:
            name = preset
        else:
            family = DATASETS[dataset].method_preset if dataset in DATASETS else "paper"
            name = family if family in cls.PRESETS else "paper"
            name = f"{name}-{num_tasks}tasks" if f"{name}-{num_tasks}tasks" in cls.PRESETS else name
        if name not in cls.PRESETS:
            raise ValueError(f"unknown preset {name!r} for {cls.NAME}; choose one of {sorted(cls.PRESETS)}")
        return name

    def validate_for_backbone(self) -> None:
        """Raise ConfigError when the config does not fit the backbone (e.g. layer indices)."""

    def require_layers_fit(self, name: str, layers: tuple[int, ...]) -> None:
        require(not layers or max(layers) < self.depth, f"{name} {layers} exceed the backbone's {self.depth} blocks")

    # --- the per-task contract -------------------------------------------------------------
    def begin_task(self, task: TaskInfo) -> None:
        self.seen_classes = task.num_seen

    def phases(self, task: TaskInfo) -> list[Phase]:
        raise NotImplementedError

    def training_loss(self, images: torch.Tensor, labels: torch.Tensor, task: TaskInfo,
                      phase: Phase) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def end_task(self, task: TaskInfo, train_batches: Callable[[], Iterable],
                 snapshot: Callable[[str], None]) -> None:
        """After-task work; ``train_batches()`` yields the task's training batches afresh (no
        shuffling, the test-time pipeline; ``train_batches(augmented=True)``: the training one);
        ``snapshot(name)`` records an intermediate evaluation of all seen tasks
        (e.g. before classifier alignment) as row ``task`` of the accuracy matrix ``name``."""

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Class prediction among the classes seen so far."""
        return self.predict_with_details(images)[0]

    @torch.no_grad()
    def predict_with_details(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Predictions plus per-sample diagnostics; ``task`` (the inferred task id) is scored as
        task-identity accuracy by the engine."""
        return self.seen_class_logits(self.logits(images)).argmax(dim=-1), {}

    def seen_class_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Test-time logits restricted to the classes seen so far. A config with
        ``compat_unmasked_test_logits`` set keeps every class, untrained rows included, as the
        HiDe/NoRGa code base and the L2P/DualPrompt code it builds on (google-research/l2p and its
        PyTorch ports) evaluate."""
        if getattr(self.config, "compat_unmasked_test_logits", False):
            return logits
        return mask_logits(logits, range(0, self.seen_classes))

    def augmented_statistics(self) -> bool:
        """Whether a statistics pass reads the training augmentations: when the config's
        ``compat_augmented_statistics`` asks for the reference's and the benchmark has them (such
        images never repeat, so their frozen features are not stored)."""
        return bool(getattr(self.config, "compat_augmented_statistics", False)) and self.training_augmented

    def report_state(self) -> dict[str, object]:
        """What a report shows of the trained method beyond accuracies (JSON-able, in
        ``summary.json`` under ``method_state``): e.g. expert usage, gate scalars."""
        return {}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.startswith("backbone.")]

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """Everything but the frozen backbone (rebuilt from its name and weights on resume)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor], seen_classes: int) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("backbone.")]
        if missing or unexpected:
            raise ValueError(f"checkpoint does not fit {self.NAME}: missing {missing}, unexpected {unexpected}")
        self.seen_classes = seen_classes

    # --- helpers for subclasses --------------------------------------------------------------
    @torch.no_grad()
    def frozen_features(self, images: torch.Tensor, *, storable: bool = True) -> torch.Tensor:
        """The frozen backbone's un-prompted [CLS] feature: the query of query-based selection,
        task-identity and prototype inputs. Read from the run's feature store when it has one
        (the engine attaches it), so a study computes it once per image; ``storable=False`` for
        images that never repeat (augmented ones), which are computed and not stored."""
        self.frozen_images_requested += len(images)
        if self.feature_store is None or not storable:
            self.frozen_images_computed += len(images)
            return self.frozen_encoder(images)
        return self.feature_store.features(images, self.frozen_encoder)

    @torch.no_grad()
    def collect_features(self, encode: Callable[[torch.Tensor], torch.Tensor], batches: Iterable, *,
                         prompted: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, labels) of ``batches`` through ``encode``, for the fits of ``end_task``;
        ``prompted``: whether ``encode`` makes a prompted pass (counted as training work per image,
        as are the frozen passes it makes through :meth:`frozen_features`). The passes run under the
        run's autocast (``pass_autocast``, set by the engine) and the features come back in fp32; the
        engine runs ``end_task`` itself without autocast, because statistics, task-identity and
        replay-alignment fits in bf16 break (NoRGa on digits: task identity 86 % in fp32, 21 % with
        its end_task under bf16 autocast)."""
        device = self.device()
        feats, labels = [], []
        frozen_before = self.frozen_images_requested
        for images, y in batches:
            with self.pass_autocast():
                feats.append(encode(images.to(device)).float())
            labels.append(y.to(device))
            if prompted:
                self.end_of_task_pass_images["prompted"] += len(y)
        # frozen passes made by encode itself (the features, or a prompted pass's query)
        self.end_of_task_pass_images["frozen"] += self.frozen_images_requested - frozen_before
        if not feats:  # this rank's shard of a task smaller than the world: it still joins the reductions
            return torch.empty(0, self.embed_dim, device=device), torch.empty(0, dtype=torch.long, device=device)
        return torch.cat(feats), torch.cat(labels)

    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device


@dataclass
class MethodEntry:
    cls: Optional[type] = None
    import_error: Optional[BaseException] = field(default=None, repr=False)
