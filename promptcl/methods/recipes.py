"""Training recipes shared by methods from the same code base.

NoRGa's baseline trainer (L2P, DualPrompt, S-Prompt++ in its table): its 5-datasets scripts train 40
epochs with Sup-21K and keep the configs' 20 with iBOT-21K (``NORGA_BASELINE_SCRIPTS``, applied by
``PromptMethod.preset_for`` to the presets of that config: DualPrompt's and S-Prompt++'s ``5datasets``,
L2P's ``norga-5datasets``; L2P's ``5datasets`` is l2p-pytorch's); its CUB configs step the learning
rate on the first task only (:func:`norga_cub_schedule`).

VQ-Prompt's code base, on which SMoPE's is built: AdamW with the prompts at a multiple of the
head's learning rate, held at ``min_lr`` for ``lr_hold_iters`` iterations then a cosine down to it
(``schedule="hold-cosine"``; the CUB scripts use CODA's per-epoch cosine instead, "epoch-cosine");
after each task, per-class diagonal Gaussians of the prompted features and (task >= 1) the head
realigned on Gaussian replays of every seen class (by default fitted on un-augmented images; the
code's augmented ones with ``compat_augmented_statistics``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
from torch import nn

from promptcl.config import require
from promptcl.core.alignment import ClassGaussians, align_head
from promptcl.methods.base import TaskInfo, coda_cosine, hold_then_cosine, per_epoch


NORGA_BASELINE_SCRIPTS = {("five_datasets", "sup21k"): dict(epochs=40)}


def norga_cub_schedule(task: TaskInfo, epochs: int) -> Optional[Callable[[int, int], float]]:
    """The learning rate of NoRGa's baseline trainer on CUB (``--sched step``: timm's StepLR, x0.1
    every 30 epochs, no warm-up). The trainer steps it after each epoch with that epoch's index, so
    epoch e trains at 0.1 ** ((e - 1) // 30); and it is bound to the first task's optimizer, which
    every later task replaces: from the second task on the rate stays at its base."""
    if task.index > 0:
        return None
    return per_epoch(lambda e, n: 0.1 ** (max(e - 1, 0) // 30), epochs)


BaselineSchedule = Literal["constant", "coda_cosine", "norga_cub"]


def baseline_schedule(schedule: BaselineSchedule, task: TaskInfo,
                      epochs: int) -> Optional[Callable[[int, int], float]]:
    """The L2P / DualPrompt lineages' learning-rate factor: constant (the ports), CODA's per-epoch
    cosine (its L2P++ and DualPrompt) or NoRGa's CUB step schedule."""
    if schedule == "coda_cosine":
        return coda_cosine(epochs)
    return norga_cub_schedule(task, epochs) if schedule == "norga_cub" else None


@dataclass(frozen=True, kw_only=True)
class AlignedRecipe:
    epochs: int = 20
    batch_size: int = 128
    lr: float = 0.005  # the head; prompts train at prompt_lr_multiplier x lr
    prompt_lr_multiplier: float = 5.0
    lr_hold_iters: int = 80
    min_lr: float = 1e-6
    schedule: Literal["hold-cosine", "epoch-cosine"] = "hold-cosine"
    classifier_alignment: bool = True
    ca_epochs: int = 50
    ca_samples_per_class: int = 128
    ca_lr: float = 1e-5
    ca_min_lr: float = 1e-6
    ca_weight_decay: float = 5e-4
    # The reference fits the class Gaussians (and SMoPE counts expert usage) on augmented training
    # images; by default every statistics pass reads the test-time pipeline (no augmentation).
    compat_augmented_statistics: bool = False
    # The reference's held-then-cosine scheduler (``CosineSchedulerIter``) is laid over a configured
    # ``iter_step`` x epochs steps, not the phase's real ones: a shorter phase stops mid-cosine, a longer
    # one ends at min_lr. 0: over the real steps; N: over N x epochs, as the config's ``iter_step: N``.
    compat_schedule_iter_step: int = 0
    # That scheduler's constructor also sets each group to its base rate and then steps the schedule from
    # its start after each update: every phase's first update runs at the full rate, not the held min_lr,
    # and the schedule follows one update late. Likewise the head's alignment: its first step at the
    # group's rate, the reference's ``ca_lr``, which is ten times its schedule's base (``ca_lr`` here).
    compat_first_step_at_base_lr: bool = False
    # The reference's class Gaussians are K-means with one cluster and ``np.var``: the population
    # variance (n in the denominator); promptcl's statistics take the unbiased one (n - 1).
    compat_population_variance: bool = False

    def __post_init__(self) -> None:
        require(self.epochs >= 1 and self.batch_size >= 1, "epochs and batch_size must be >= 1")
        require(self.lr > 0 and self.ca_lr > 0 and self.prompt_lr_multiplier > 0, "learning rates must be > 0")
        require(0 <= self.min_lr <= self.lr and 0 <= self.ca_min_lr <= self.ca_lr,
                "min learning rates must be in [0, base lr]")
        require(self.lr_hold_iters >= 0 and self.ca_epochs >= 0 and self.ca_samples_per_class >= 1,
                "lr_hold_iters, ca_epochs must be >= 0 and ca_samples_per_class >= 1")
        require(self.schedule in ("hold-cosine", "epoch-cosine"), f"unknown schedule {self.schedule!r}")
        require(self.ca_weight_decay >= 0, f"ca_weight_decay must be >= 0, got {self.ca_weight_decay}")
        require(self.compat_schedule_iter_step >= 0,
                f"compat_schedule_iter_step must be >= 0, got {self.compat_schedule_iter_step}")
        require(self.compat_schedule_iter_step == 0 or self.schedule == "hold-cosine",
                "compat_schedule_iter_step applies to the hold-cosine schedule only")

    def class_statistics(self, num_classes: int, dim: int) -> ClassGaussians:
        """The per-class diagonal Gaussians the head is realigned on."""
        return ClassGaussians(num_classes, dim, covariance="diag", unbiased=not self.compat_population_variance)

    def param_groups(self, prompt_params: list[nn.Parameter], head: nn.Module,
                     epochs: int) -> tuple[list[dict], list[Callable]]:
        """(optimizer groups, one schedule per group over a phase of ``epochs``): each group is held
        at, then decays to, the absolute ``min_lr`` (as the reference's scheduler), or follows
        CODA's per-epoch cosine."""
        groups = [{"params": prompt_params, "lr": self.lr * self.prompt_lr_multiplier},
                  {"params": list(head.parameters()), "lr": self.lr}]
        if self.schedule == "epoch-cosine":
            return groups, [coda_cosine(epochs)] * len(groups)
        factors = [hold_then_cosine(self.lr_hold_iters, self.min_lr / g["lr"]) for g in groups]
        if self.compat_schedule_iter_step:
            steps = self.compat_schedule_iter_step * epochs
            factors = [lambda it, _total, f=f: f(it, steps) for f in factors]
        if self.compat_first_step_at_base_lr:  # a base-rate update in front, the schedule one update later
            factors = [lambda it, total, f=f: 1.0 if it == 0 else f(it - 1, total) for f in factors]
        return groups, factors

    def align(self, head: nn.Module, class_stats: ClassGaussians, task: TaskInfo,
              snapshot: Callable[[str], None]) -> None:
        """After task >= 1: record the accuracy before, then realign ``head`` on Gaussian replays."""
        if task.index == 0 or not self.classifier_alignment or self.ca_epochs == 0:
            return
        snapshot("before_alignment")
        generator = torch.Generator().manual_seed(torch.initial_seed() + task.index)
        with torch.enable_grad():
            align_head(head, class_stats, seen=range(0, task.num_seen), iterations=task.classes.start,
                       epochs=self.ca_epochs, samples_per_class=self.ca_samples_per_class, lr=self.ca_lr,
                       min_lr=self.ca_min_lr, weight_decay=self.ca_weight_decay, generator=generator,
                       # the reference's ratio of its group's rate to its schedule's start, whatever the preset
                       first_step_lr=10 * self.ca_lr if self.compat_first_step_at_base_lr else None)
