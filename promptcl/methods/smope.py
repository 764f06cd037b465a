"""SMoPE: sparse mixture of prompt experts (Le et al., ICLR 2026), following the reference code.

Per task: (task 0 only) a dense warm-up with all experts and CE; sparse top-k training with the
adaptive noise, router and prototype losses; a usage-counting pass; per-class diagonal Gaussians
on the prompted features; (task >= 1) classifier alignment by Gaussian replay. One forward pass
at test time.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from promptcl.core.backbone import encode
from promptcl.config import require, require_layers
from promptcl.core.experts import Routing, SparsePromptExperts
from promptcl.methods import register_method
from promptcl.methods.base import Phase, PromptMethod, TaskInfo, mask_logits
from promptcl.methods.recipes import AlignedRecipe


@dataclass(frozen=True, kw_only=True)
class SMoPEConfig(AlignedRecipe):
    """Defaults are the paper's Split CIFAR-100 (10 tasks) settings (reference scripts)."""

    prompt_layers: tuple[int, ...] = (0, 1, 2, 3, 4, 5)
    num_experts: int = 25
    top_k: int = 5
    noise_scale: float = 0.4
    router_weight: float = 1e-5
    proto_weight: float = 1e-5
    frequency_threshold: Literal["used", "all"] = "used"
    dense_warmup_fraction: float = 0.5
    # The reference's evaluation mode pushes experts never used so far out of the clean top-k (an
    # offset of twice the score range; counts grow batch by batch, as there); its final numbers come
    # from checkpoints without usage counts, hence plain top-k, our default. On, it changes the
    # evaluations and, through the routing of earlier layers, the usage counts from layer 1 on.
    compat_exclude_unused_experts: bool = False
    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.num_experts >= 1, f"num_experts must be >= 1, got {self.num_experts}")
        require(1 <= self.top_k <= self.num_experts,
                f"top_k={self.top_k} must be between 1 and num_experts={self.num_experts}")
        require(0.0 <= self.noise_scale <= 1.0, f"noise_scale must be in [0, 1], got {self.noise_scale}")
        require(self.router_weight >= 0 and self.proto_weight >= 0, "loss weights must be >= 0")
        require(0.0 <= self.dense_warmup_fraction <= 1.0, "dense_warmup_fraction must be in [0, 1]")
        require_layers("prompt_layers", self.prompt_layers)


PAPER = SMoPEConfig()
# The reference scripts' other benchmarks (smope.md 5): ImageNet-R per task count, and CUB-200 with
# CODA's per-epoch cosine instead of the held-then-cosine schedule.
IMAGENET_R = dataclasses.replace(PAPER, batch_size=64, lr=0.0025, noise_scale=0.5, router_weight=5e-5,
                                 proto_weight=1e-4, lr_hold_iters=40, ca_samples_per_class=384)
IMAGENET_R_5 = dataclasses.replace(IMAGENET_R, noise_scale=0.7, router_weight=1e-4, proto_weight=1e-5,
                                   lr_hold_iters=80, ca_epochs=60, ca_samples_per_class=128)
IMAGENET_R_20 = dataclasses.replace(IMAGENET_R, noise_scale=0.3, router_weight=1e-4, proto_weight=5e-5,
                                    lr_hold_iters=20, ca_samples_per_class=256)
CUB200 = dataclasses.replace(PAPER, proto_weight=5e-5, schedule="epoch-cosine", lr_hold_iters=0)
# Scaled to the small offline ViTs (vit_digits: 4 blocks; vit_glyphs28: 6 blocks) and their benchmarks.
SMALL = dataclasses.replace(
    PAPER, prompt_layers=(0, 1, 2), num_experts=8, top_k=2, router_weight=1e-4, proto_weight=1e-4,
    epochs=6, batch_size=32, lr=0.01, lr_hold_iters=0, ca_epochs=20, ca_samples_per_class=32,
    ca_lr=1e-3, ca_min_lr=1e-5,
)


@register_method("smope")
class SMoPE(PromptMethod):
    Config = SMoPEConfig
    PRESETS = {"paper": PAPER, "imagenet-r": IMAGENET_R, "imagenet-r-5tasks": IMAGENET_R_5,
               "imagenet-r-20tasks": IMAGENET_R_20, "cub200": CUB200, "small": SMALL}
    TEST_PASSES = 1
    REFERENCE_CODE_BASE = "coda"

    def __init__(self, config: SMoPEConfig, *, backbone: nn.Module, num_classes: int, num_tasks: int) -> None:
        super().__init__(config, backbone=backbone, num_classes=num_classes, num_tasks=num_tasks)
        self.experts = SparsePromptExperts(
            layers=config.prompt_layers, num_heads=self.num_heads, head_dim=self.head_dim,
            num_experts=config.num_experts, top_k=config.top_k, noise_scale=config.noise_scale,
            exclude_unused_when_clean=config.compat_exclude_unused_experts,
        )
        self.head = self.classifier(num_classes)
        self.class_stats = config.class_statistics(num_classes, self.embed_dim)

    def validate_for_backbone(self) -> None:
        self.require_layers_fit("prompt_layers", self.config.prompt_layers)

    # --- forward -----------------------------------------------------------------------------
    def features(self, images: torch.Tensor, *, mode: str = "sparse", noisy: bool = False,
                 routing: Routing | None = None) -> torch.Tensor:
        routing = Routing() if routing is None else routing
        return encode(self.backbone, images, self.experts.prompts(mode, noisy=noisy, routing=routing))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def report_state(self) -> dict[str, object]:
        """Top-k usage counts of every expert, ``[prompted layer][head][expert]`` (clean routing
        over each task's training set, summed over tasks)."""
        return {"expert_usage": self.experts.usage.tolist(), "prompt_layers": list(self.config.prompt_layers)}

    # --- training ----------------------------------------------------------------------------
    def begin_task(self, task: TaskInfo) -> None:
        super().begin_task(task)
        if task.index > 0:
            self.experts.begin_task(self.config.frequency_threshold)

    def phases(self, task: TaskInfo) -> list[Phase]:
        c = self.config
        params = [self.experts.keys, self.experts.values]
        phases = []
        warmup = int(c.dense_warmup_fraction * c.epochs)
        if task.index == 0 and warmup > 0:
            groups, schedule = c.param_groups(params, self.head, warmup)
            phases.append(Phase("dense_warmup", warmup, groups, lr_factor=schedule))
        groups, schedule = c.param_groups(params, self.head, c.epochs)
        phases.append(Phase("sparse", c.epochs, groups, lr_factor=schedule))
        return phases

    def training_loss(self, images, labels, task: TaskInfo, phase: Phase):
        dense = phase.name == "dense_warmup"
        routing = Routing()
        feats = self.features(images, mode="dense" if dense else "sparse", noisy=not dense, routing=routing)
        # Only the current task's classes compete during training (old-class logits masked).
        ce = F.cross_entropy(mask_logits(self.head(feats), task.classes), labels)
        logs = {"ce": ce.detach().item()}
        loss = ce
        if not dense and self.config.router_weight > 0:
            router = self.experts.router_loss(routing)
            loss = loss + self.config.router_weight * router
            logs["router"] = router.detach().item()
        if not dense and task.index > 0 and self.config.proto_weight > 0:
            proto = self.experts.prototype_loss()
            loss = loss + self.config.proto_weight * proto
            logs["proto"] = proto.detach().item()
        return loss, logs

    @torch.no_grad()
    def end_task(self, task: TaskInfo, train_batches: Callable[[], Iterable],
                 snapshot: Callable[[str], None]) -> None:
        self.eval()
        # One pass over the task's training set: clean top-k usage counts and the features.
        def features_counting_usage(images: torch.Tensor) -> torch.Tensor:
            routing = Routing()
            feats = self.features(images, routing=routing)
            self.experts.count_usage(routing)
            return feats

        usage_before = self.experts.usage.clone()
        batches = train_batches(augmented=self.augmented_statistics())
        self.class_stats.fit(*self.collect_features(features_counting_usage, batches, prompted=True))
        self.experts.sum_usage_over_ranks(usage_before)
        self.config.align(self.head, self.class_stats, task, snapshot)
        self.eval()
