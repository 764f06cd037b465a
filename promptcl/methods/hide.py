"""HiDe-Prompt (Wang et al., NeurIPS 2023), as run by the NoRGa reference code.

Two stages per task. Task-identity inference (:mod:`promptcl.core.tii`) on the frozen backbone; and
within-task prediction with one prefix prompt per task in blocks 0-4 (initialised from the
previous task's prompt, trained with masked CE plus a contrastive term against stored class
means, prompt momentum), then per-class Gaussians on prompted features and task-adaptive
prediction (TAP: the head realigned on Gaussian replays). Inference: pass 1 infers the task,
pass 2 runs the backbone with that task's prompt.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from promptcl.core.alignment import STATISTICS, Statistics, align_head, class_statistics
from promptcl.core.attention import static_prompt
from promptcl.core.backbone import encode
from promptcl.core.prompts import reference_batch_mixed_pairs
from promptcl.config import require, require_layers
from promptcl.distributed import gather_in_order
from promptcl.methods import register_method
from promptcl.methods.base import Phase, PromptMethod, TaskInfo, mask_logits, per_epoch, timm_linear_init
from promptcl.core.tii import TaskIdentifier

CONTRASTIVE_TEMPERATURE = 0.8  # the reference's fixed divisor of the similarity matrix


@dataclass(frozen=True, kw_only=True)
class HiDeConfig:
    """Defaults: the reference's Split CIFAR-100 / Sup-21K script (effective learning rates)."""

    prompt_layers: tuple[int, ...] = (0, 1, 2, 3, 4)
    prompt_length: int = 5
    prompt_momentum: float = 0.01
    reg: float = 0.1  # weight of the contrastive term against stored class means
    # The contrastive term compares each image with the others of its batch, so a data-parallel run
    # computes it over each GPU's share: the term is the mean over groups of this many images of a
    # worker's batch (HiDe-Prompt's scripts: 24 per GPU). 0: the worker's whole batch as one group.
    contrastive_group: int = 0
    epochs: int = 50
    batch_size: int = 128
    lr: float = 0.015  # prompts (and gates)
    head_lr: float = 0.0015
    schedule: Literal["step", "cosine", "constant"] = "step"
    grad_clip: float = 1.0
    tap_lr: float = 0.005
    tap_epochs: int = 30
    tap_samples_per_class: int = 640
    tii_structure: tuple[int, ...] = (2,)
    tii_lr: float = 2.5e-4
    tii_epochs: int = 20
    tii_ca_lr: float = 2.5e-3
    tii_ca_epochs: int = 30
    tii_ca_samples_per_class: int = 128
    tii_grad_clip: float = 1.0
    # Per-class statistics of both stages (replays, and the contrastive term's stored means):
    # NoRGa's scripts use "covariance"; HiDe-Prompt's own default is "multi-centroid" (K-means
    # with n_centroids clusters per class, a diagonal Gaussian each); "variance" is diagonal.
    statistics: Statistics = "covariance"
    n_centroids: int = 10
    # Stage A trains on a fresh frozen pass over augmented training images every epoch, as the
    # reference; False: on un-augmented frozen features computed once (tii_epochs times cheaper).
    # Benchmarks without training augmentation (the offline ones) compute them once either way.
    tii_augmented: bool = True
    # Reproduce the reference's reshape-instead-of-permute prompt gather (samples get other
    # samples' key/value halves) and, with batchwise_prompt, its per-batch majority-vote task.
    compat_reference_gather: bool = False
    batchwise_prompt: bool = False  # the reference's 5-datasets setting; only with the compat gather
    # The reference takes the argmax over all classes at test time, untrained rows included.
    compat_unmasked_test_logits: bool = False

    def inert_switches(self) -> tuple[str, ...]:
        """The reference's 5-datasets configs set ``batchwise_prompt`` (so do the presets that copy
        them), but the vote acts through the compat gather only: alone it is not a batch-dependent
        protocol (no ``unfair_protocol`` tag, no refusal on several workers)."""
        return () if self.compat_reference_gather else ("batchwise_prompt",)

    def shard_conflict(self, num_workers: int) -> Optional[str]:
        """Why ``num_workers`` data-parallel workers would not train this objective, if not. Each
        worker computes the contrastive term over its own share of the batch (as HiDe-Prompt's
        scripts do per GPU), so the term must be per group of a size that divides a share: then a
        worker's groups are random groups of the batch of that size, as in one process."""
        share = self.batch_size // num_workers
        if num_workers == 1 or self.reg == 0 or (self.contrastive_group and share % self.contrastive_group == 0):
            return None
        given = ("over the whole batch (contrastive_group=0)" if not self.contrastive_group
                 else f"per group of contrastive_group={self.contrastive_group}")
        return (f"the contrastive term {given} would be over each of the {num_workers} workers' shares of "
                f"{share} images; set contrastive_group to a divisor of {share} (HiDe-Prompt's scripts group per "
                "GPU) or reg=0")

    def __post_init__(self) -> None:
        require_layers("prompt_layers", self.prompt_layers)
        require(self.prompt_length >= 1, f"prompt_length must be >= 1, got {self.prompt_length}")
        require(0.0 <= self.prompt_momentum < 1.0, f"prompt_momentum must be in [0, 1), got {self.prompt_momentum}")
        require(self.reg >= 0, f"reg must be >= 0, got {self.reg}")
        require(self.contrastive_group >= 0, f"contrastive_group must be >= 0, got {self.contrastive_group}")
        require(self.epochs >= 1 and self.batch_size >= 1 and self.tii_epochs >= 1,
                "epochs, tii_epochs and batch_size must be >= 1")
        require(min(self.lr, self.head_lr, self.tap_lr, self.tii_lr, self.tii_ca_lr) > 0, "learning rates must be > 0")
        require(self.tap_epochs >= 0 and self.tii_ca_epochs >= 0, "tap_epochs and tii_ca_epochs must be >= 0")
        require(self.tap_samples_per_class >= 1 and self.tii_ca_samples_per_class >= 1,
                "samples per class must be >= 1")
        require(self.grad_clip >= 0 and self.tii_grad_clip >= 0, "grad_clip and tii_grad_clip must be >= 0")
        require(self.schedule in ("step", "cosine", "constant"), f"unknown schedule {self.schedule!r}")
        require(len(self.tii_structure) >= 1 and min(self.tii_structure) >= 1,
                f"tii_structure must be positive width multiples, got {self.tii_structure}")
        require(self.statistics in STATISTICS,
                f"statistics must be one of {list(STATISTICS)}, got {self.statistics!r}")
        require(self.n_centroids >= 1, f"n_centroids must be >= 1, got {self.n_centroids}")


def reference_presets(base: HiDeConfig) -> dict[str, HiDeConfig]:
    """Per-benchmark settings of the reference scripts (norga.md 1.6), from the CIFAR-100 default."""
    r = dataclasses.replace
    return {
        "paper": base,
        "imagenet-r": r(base, prompt_length=20, reg=0.5, epochs=150, schedule="cosine"),
        "cub200": r(base, prompt_length=20, reg=0.01, head_lr=0.015, tii_lr=5e-3),
        "5datasets": r(base, prompt_length=40, epochs=20, schedule="constant", grad_clip=2.0,
                       tii_structure=(4, 4), tii_lr=5e-4, batchwise_prompt=True),
        # Scaled to the small offline ViTs (4-6 blocks) and their benchmarks (tasks of 300-3,000 images).
        "small": r(base, prompt_layers=(0, 1, 2), prompt_length=2, epochs=5, batch_size=32, lr=0.01,
                    head_lr=0.001, schedule="constant", tap_lr=0.01, tap_epochs=10, tap_samples_per_class=160,
                    tii_lr=1e-3, tii_epochs=10, tii_ca_lr=1e-2, tii_ca_epochs=10, tii_ca_samples_per_class=32),
    }


def upstream_presets(base: HiDeConfig) -> dict[str, HiDeConfig]:
    """HiDe-Prompt's own scripts (thu-ml/HiDe-Prompt ``training_scripts/train_{cifar100,imr,cub,
    5datsets}_vit.sh``), which made the HiDe-Prompt paper's numbers, as effective settings.

    They run data-parallel on 8 GPUs x 24 images (5-datasets: 4 x 32), so the global batch is 192
    (128); with ``unscale_lr`` the rates are scaled by the per-GPU batch / 256, not the global one
    (stage B's prompts from 0.03, its head at a tenth with ``--larger_prompt_lr``, which the CUB
    script omits; stage A from each script's ``--lr``, its realignment from 0.005; stage B's TAP
    rate is not scaled). Every rank is seeded alike, so the Gaussian replays are the same on every
    GPU: one GPU's draw is the step (TAP 5 x 24 per cluster, stage A 24). Statistics are
    multi-centroid (10 per class). The contrastive term is computed per group of one GPU's batch, as
    there (``contrastive_group``); every other term is a global-batch mean. So one worker runs the
    scripts' objective, as does any worker count that divides the GPU count (whose per-worker batch
    is whole groups; otherwise a short group weighs as much as a full one).
    """
    r = dataclasses.replace

    def scripted(per_gpu: int, gpus: int, tii_lr: float, larger_prompt_lr: bool = True, **settings) -> HiDeConfig:
        scale = per_gpu / 256
        head_lr = (0.003 if larger_prompt_lr else 0.03) * scale
        return r(base, batch_size=per_gpu * gpus, lr=0.03 * scale, head_lr=head_lr,
                 tii_lr=tii_lr * scale, tii_ca_lr=0.005 * scale, tii_ca_samples_per_class=per_gpu,
                 tap_samples_per_class=5 * per_gpu, statistics="multi-centroid", n_centroids=10,
                 contrastive_group=per_gpu, **settings)

    return {
        "upstream-cifar100": scripted(24, 8, 5e-4),
        "upstream-imagenet-r": scripted(24, 8, 5e-4, prompt_length=20, reg=0.5, epochs=150, schedule="cosine"),
        "upstream-cub200": scripted(24, 8, 1e-2, larger_prompt_lr=False, prompt_length=20, reg=0.01),
        "upstream-5datasets": scripted(32, 4, 1e-3, prompt_length=40, epochs=20, schedule="constant",
                                       grad_clip=2.0, tii_structure=(4, 4), batchwise_prompt=True),
    }


def epoch_schedule(kind: str, epochs: int, floor: float) -> Callable[[int, int], float]:
    """timm's per-epoch schedulers as the reference steps them (after each epoch, with its index):
    epoch k trains with the rate set for k - 1, so the step decay first applies at epoch 31."""

    def factor(k: int, _epochs: int) -> float:
        e = max(k - 1, 0)
        if kind == "step":
            return 0.1 ** (e // 30)
        if kind == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * e / epochs)) if k else 1.0
        return 1.0

    return per_epoch(factor, epochs)


COSINE_MIN_LR = 1e-5  # the reference's timm cosine floor (absolute, per group)
SELF_SUPERVISED = ("ibot21k", "ibot1k", "dino1k", "mocov3_1k")


# HiDe's scripts with self-supervised backbones (norga.md 1.6): shorter prompt training, more momentum.
HIDE_SCRIPTS = {
    **{("cifar100", b): dict(epochs=20, prompt_momentum=0.1) for b in SELF_SUPERVISED},
    **{("imagenet_r", b): dict(epochs=50, schedule="constant") for b in SELF_SUPERVISED},
}
# HiDe-Prompt's own scripts: the same self-supervised changes, and CUB iBOT-21K's stage A at 0.0005.
HIDE_UPSTREAM_SCRIPTS = {**HIDE_SCRIPTS, ("cub200", "ibot21k"): dict(tii_lr=5e-4 * 24 / 256)}


@register_method("hide")
class HiDePrompt(PromptMethod):
    Config = HiDeConfig
    PRESETS = {**reference_presets(HiDeConfig()), **upstream_presets(HiDeConfig())}
    SCRIPTS = HIDE_SCRIPTS
    # The reference's Sup-21K checkpoint is the original in21k ViT-B/16, not AugReg.
    DEFAULT_BACKBONES = {name: "sup21k" for name in ("cifar100", "imagenet_r", "cub200", "five_datasets")}
    TEST_PASSES = 2
    INFERS_TASK = True
    REFERENCE_CODE_BASE = "hide"

    def __init__(self, config: HiDeConfig, *, backbone: nn.Module, num_classes: int, num_tasks: int) -> None:
        super().__init__(config, backbone=backbone, num_classes=num_classes, num_tasks=num_tasks)
        shape = (len(config.prompt_layers), 2, num_tasks, config.prompt_length, self.num_heads, self.head_dim)
        # [layer, key/value, task slot, length, head, head_dim], uniform(-1, 1) as in the reference
        self.prompts = nn.Parameter(torch.empty(shape).uniform_(-1.0, 1.0))
        self.gates = self.make_gates()
        self.head = self.classifier(num_classes)
        self.class_stats = class_statistics(config.statistics, num_classes, self.embed_dim, config.n_centroids)
        # MoCo v3: the reference's fc_norm ends the task-identity MLP in place of its own norm
        self.tii = TaskIdentifier(self.embed_dim, num_classes, config.tii_structure,
                                  statistics=config.statistics, centroids=config.n_centroids,
                                  final_norm=self.classifier_norm())
        timm_linear_init(self.head, self.tii)  # the reference's init, not PyTorch's default
        self.register_buffer("task_of_class", torch.full((num_classes,), -1, dtype=torch.long))

    @classmethod
    def scripts_for(cls, preset: str) -> dict[tuple[str, str], dict]:
        return HIDE_UPSTREAM_SCRIPTS if preset.startswith("upstream-") else super().scripts_for(preset)

    def make_gates(self) -> nn.ModuleList:
        """One gate per prompted layer; HiDe-Prompt's prefix tuning is linear (no gate modules)."""
        return nn.ModuleList()

    def validate_for_backbone(self) -> None:
        self.require_layers_fit("prompt_layers", self.config.prompt_layers)

    # --- prompts -----------------------------------------------------------------------------
    def gathered_prompts(self, task_ids: torch.Tensor, momentum_task: Optional[int] = None) -> torch.Tensor:
        """``[layer, key/value, batch, length, head, head_dim]``: each sample's task prompt.

        ``momentum_task`` t > 0 uses ``(1 - m) P_t + m * mean(P_<t)`` (the mean detached), the
        prompt that task t trains through."""
        P = self.prompts
        m = self.config.prompt_momentum
        if momentum_task is not None and momentum_task > 0 and m > 0:
            slot = (1 - m) * P[:, :, momentum_task] + m * P[:, :, :momentum_task].mean(2).detach()
            return slot.unsqueeze(2).expand(-1, -1, len(task_ids), -1, -1, -1)
        return P[:, :, task_ids]

    def layer_prompts(self, gathered: torch.Tensor) -> dict:
        L = gathered.shape[0]
        if self.config.compat_reference_gather:
            keys, values = reference_batch_mixed_pairs(gathered)
        else:
            keys, values = gathered[:, 0], gathered[:, 1]
        keys, values = keys.transpose(2, 3), values.transpose(2, 3)  # [L, B, H, length, d]
        gates = list(self.gates) or [None] * L
        return {layer: static_prompt(keys[i], values[i], gates[i])
                for i, layer in enumerate(self.config.prompt_layers)}

    def features(self, images: torch.Tensor, task_ids: torch.Tensor, momentum_task: Optional[int] = None):
        return encode(self.backbone, images, self.layer_prompts(self.gathered_prompts(task_ids, momentum_task)))

    # --- training ----------------------------------------------------------------------------
    def begin_task(self, task: TaskInfo) -> None:
        super().begin_task(task)
        t = task.index
        self.task_of_class[task.classes.start:task.classes.stop] = t
        if t > 0:
            self.freeze_gates_after_first_task()
            with torch.no_grad():  # the new prompt starts from the previous task's
                self.prompts[:, :, t] = self.prompts[:, :, t - 1]

    def freeze_gates_after_first_task(self) -> None:
        """NoRGa's gate scalars are learnable on the first task only."""

    def phases(self, task: TaskInfo) -> list[Phase]:
        c = self.config
        prompt_params = [self.prompts] + [p for p in self.gates.parameters() if p.requires_grad]
        groups = [{"params": prompt_params, "lr": c.lr}, {"params": list(self.head.parameters()), "lr": c.head_lr}]
        factors = [epoch_schedule(c.schedule, c.epochs, COSINE_MIN_LR / g["lr"]) for g in groups]
        return [Phase("wtp", c.epochs, groups, lr_factor=factors, grad_clip=c.grad_clip or None)]

    def training_loss(self, images, labels, task: TaskInfo, phase: Phase):
        t = task.index
        ids = torch.full((len(images),), t, dtype=torch.long, device=images.device)
        feats = self.features(images, ids, momentum_task=t)
        ce = F.cross_entropy(mask_logits(self.head(feats), task.classes), labels)
        loss, logs = ce, {"ce": ce.detach().item()}
        if self.config.reg > 0:
            contrastive = self.contrastive_loss(feats, old_classes=task.classes.start)
            loss = loss + self.config.reg * contrastive
            logs["contrastive"] = contrastive.detach().item()
        return loss, logs

    def contrastive_loss(self, feats: torch.Tensor, old_classes: int) -> torch.Tensor:
        """Every row of [old class means (every cluster mean with multi-centroid statistics); batch
        features] must be most similar to itself; the mean of that over the ``contrastive_group``
        groups of the batch (a data-parallel run averages the per-GPU terms' gradients)."""
        means = self.class_stats.means(range(0, old_classes)).detach()
        groups = feats.split(self.config.contrastive_group or len(feats))
        return torch.stack([self._contrastive_term(means, group) for group in groups]).mean()

    @staticmethod
    def _contrastive_term(means: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        rows = torch.cat([means, feats])
        sims = rows @ rows.T / CONTRASTIVE_TEMPERATURE
        return F.cross_entropy(sims, torch.arange(len(rows), device=rows.device))

    @torch.no_grad()
    def end_task(self, task: TaskInfo, train_batches: Callable[[], Iterable],
                 snapshot: Callable[[str], None]) -> None:
        c, t = self.config, task.index
        generator = torch.Generator().manual_seed(torch.initial_seed() + t)
        self.eval()
        if t > 0 and c.prompt_momentum > 0:  # store the prompt that was trained through
            self.prompts[:, :, t] = ((1 - c.prompt_momentum) * self.prompts[:, :, t]
                                     + c.prompt_momentum * self.prompts[:, :, :t].mean(2))
        seen = range(0, task.num_seen)
        # Stage A: task-identity inference on frozen features (each rank encodes its shard; the MLP
        # trains on all of them, in the single-process order). Statistics: un-augmented images.
        frozen, labels = self.collect_features(self.frozen_features, train_batches(), prompted=False)
        self.tii.stats.fit(frozen, labels)
        if c.tii_augmented and self.training_augmented:
            # One loader for all epochs: each pass over it draws new augmentations (new worker seeds).
            augmented = train_batches(augmented=True)

            def epoch_features():  # a fresh augmented pass per epoch, as the reference trains stage A
                fresh = self.collect_features(lambda x: self.frozen_features(x, storable=False), augmented,
                                              prompted=False)
                return gather_in_order(fresh[0]), gather_in_order(fresh[1])
        else:
            frozen, labels = gather_in_order(frozen), gather_in_order(labels)

            def epoch_features():
                return frozen, labels
        with torch.enable_grad():
            self.tii.fit_task(epoch_features, task.classes, epochs=c.tii_epochs, batch_size=c.batch_size,
                              lr=c.tii_lr, grad_clip=c.tii_grad_clip, generator=generator)
        if t > 0 and c.tii_ca_epochs > 0:
            with torch.enable_grad():
                self.tii.realign(seen=seen, iterations=task.classes.start, epochs=c.tii_ca_epochs,
                                 samples_per_class=c.tii_ca_samples_per_class, lr=c.tii_ca_lr, generator=generator)
        # Stage B: class Gaussians on features prompted with this task's prompt, then TAP.
        slot = lambda x: self.features(x, torch.full((len(x),), t, dtype=torch.long, device=x.device))  # noqa: E731
        self.class_stats.fit(*self.collect_features(slot, train_batches(), prompted=True))
        if t > 0 and c.tap_epochs > 0:
            snapshot("before_tap")
            with torch.enable_grad():
                align_head(self.head, self.class_stats, seen=seen, iterations=task.classes.start,
                           epochs=c.tap_epochs, samples_per_class=c.tap_samples_per_class, lr=c.tap_lr,
                           min_lr=0.0, weight_decay=0.0, generator=generator, optimizer="sgd",
                           cosine_per="epoch")
        self.eval()

    # --- inference ---------------------------------------------------------------------------
    @torch.no_grad()
    def infer_tasks(self, images: torch.Tensor) -> torch.Tensor:
        """Pass 1: the frozen backbone and the TII classifier pick a class, hence a task."""
        seen = range(0, self.seen_classes)
        classes = mask_logits(self.tii(self.frozen_features(images)), seen).argmax(-1)
        return self.task_of_class[classes]

    @torch.no_grad()
    def predict_with_details(self, images: torch.Tensor):
        tasks = self.infer_tasks(images)
        used = tasks
        if self.config.compat_reference_gather and self.config.batchwise_prompt:
            # The reference's 5-datasets protocol: the whole batch takes its most voted task.
            used = torch.full_like(tasks, int(torch.bincount(tasks).argmax()))
        return self.seen_class_logits(self.head(self.features(images, used))).argmax(-1), {"task": used}

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images, self.infer_tasks(images)))
