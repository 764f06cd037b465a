"""DualPrompt (Wang et al., ECCV 2022), after JH-LEE-KR/dualprompt-pytorch, and S-Prompt++, its
G-prompt-free variant that HiDe-Prompt and NoRGa report as their class-incremental S-Prompt.

A G-prompt shared by all tasks (prefix in blocks 0-1) and one E-prompt per task (prefix in blocks
2-4) with a learnable key. Training uses the true task's E-prompt and pulls its key to the frozen
[CLS] query; at test time each sample takes the E-prompt whose key is most similar to its query
(top-1 among the tasks seen so far). A new
task's E-prompt starts from the previous one's. The picked E-prompt is the inferred task, so the
run reports task-identity accuracy. Two backbone passes per image (query, then prompted).

Reference behaviours, each off by default: ``batchwise_prompt`` (the whole test batch takes its
most voted E-prompt), ``compat_reference_gather`` (the E-prompt gather's reshape-without-permute,
which hands each sample other samples' key/value halves, in training and at test time) and
``compat_unmasked_test_logits`` (test-time argmax over every class, untrained rows included) and
``compat_match_all_keys`` (the test-time key match also scores untrained future tasks' keys).
The ``norga-*`` presets are the configs NoRGa's code base (Minhchuyentoancbn/MoE_PromptCL) runs
for the baselines of its table: batch 128 and lr 0.005 x 128 / 256.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from promptcl.config import require, require_layers
from promptcl.core.backbone import encode
from promptcl.core.prompts import (SharedPrefix, batch_majority, cosine_similarity_matrix,
                                   prefix_prompt, pull_constraint, reference_batch_mixed_pairs)
from promptcl.methods import register_method
from promptcl.methods.base import Phase, PromptMethod, TaskInfo, mask_logits, timm_linear_init
from promptcl.methods.recipes import NORGA_BASELINE_SCRIPTS, norga_cub_schedule


@dataclass(frozen=True, kw_only=True)
class DualPromptConfig:
    """Defaults: the Split CIFAR-100 config of the PyTorch port (8 GPUs x 24, lr 0.03 x 24 / 256)."""

    g_layers: tuple[int, ...] = (0, 1)
    g_length: int = 5  # key tokens (= value tokens) per G layer
    e_layers: tuple[int, ...] = (2, 3, 4)
    e_length: int = 5
    pull_weight: float = 1.0
    init_range: tuple[float, ...] = (-1.0, 1.0)
    epochs: int = 5
    batch_size: int = 192
    lr: float = 0.0028125
    grad_clip: float = 1.0
    schedule: Literal["constant", "norga_cub"] = "constant"  # norga_cub: see recipes.norga_cub_schedule
    batchwise_prompt: bool = False
    compat_reference_gather: bool = False
    compat_unmasked_test_logits: bool = False
    compat_match_all_keys: bool = False

    def __post_init__(self) -> None:
        require_layers("e_layers", self.e_layers)
        require_layers("g_layers and e_layers together", self.g_layers + self.e_layers)  # g_layers may be empty
        require(self.g_length >= 1 and self.e_length >= 1, "g_length and e_length must be >= 1")
        require(len(self.init_range) == 2 and self.init_range[0] < self.init_range[1],
                f"init_range must be (low, high) with low < high, got {self.init_range}")
        require(self.pull_weight >= 0 and self.grad_clip >= 0, "pull_weight and grad_clip must be >= 0")
        require(self.epochs >= 1 and self.batch_size >= 1 and self.lr > 0, "epochs, batch_size, lr must be positive")


PAPER = DualPromptConfig()
IMAGENET_R = dataclasses.replace(PAPER, e_length=20, epochs=50, lr=0.00046875)
SMALL = dataclasses.replace(PAPER, g_layers=(0,), g_length=2, e_layers=(1, 2), e_length=2, epochs=6,
                             batch_size=32, lr=0.01)
# MoE_PromptCL configs/{cifar100,imr}_dualprompt.py as its scripts run them (--batch-size 128).
NORGA_CIFAR100 = dataclasses.replace(PAPER, e_length=20, epochs=20, batch_size=128, lr=0.0025)
NORGA_IMAGENET_R = dataclasses.replace(NORGA_CIFAR100, epochs=50)
# dualprompt-pytorch has no 5-datasets config; NoRGa's (configs/five_datasets_dualprompt.py) is the one:
# a pool of 5, 40-token E-prompts, 10-token G-prompts, pull 0.5 (its batch-wise vote: batchwise_prompt).
FIVE_DATASETS = dataclasses.replace(NORGA_CIFAR100, g_length=10, e_length=40, pull_weight=0.5)
CUB200 = dataclasses.replace(NORGA_CIFAR100, epochs=50, schedule="norga_cub")  # configs/cub_dualprompt.py


@register_method("dualprompt")
class DualPrompt(PromptMethod):
    Config = DualPromptConfig
    PRESETS = {"paper": PAPER, "imagenet-r": IMAGENET_R, "5datasets": FIVE_DATASETS, "cub200": CUB200, "small": SMALL,
               "norga-cifar100": NORGA_CIFAR100, "norga-imagenet-r": NORGA_IMAGENET_R}
    SCRIPTS = NORGA_BASELINE_SCRIPTS
    SCRIPTED_PRESETS = ("5datasets",)  # NoRGa's 5-datasets config, the one its scripts run
    TEST_PASSES = 2
    INFERS_TASK = True
    REFERENCE_CODE_BASE = "hide"

    def __init__(self, config: DualPromptConfig, *, backbone: nn.Module, num_classes: int, num_tasks: int) -> None:
        super().__init__(config, backbone=backbone, num_classes=num_classes, num_tasks=num_tasks)
        c = config
        low, high = c.init_range
        self.g_prompt = SharedPrefix({layer: c.g_length for layer in c.g_layers}, self.embed_dim, self.num_heads)
        with torch.no_grad():
            for p in self.g_prompt.prefixes:
                p.uniform_(low, high)
        # [task, layer, key/value, length, D]; one key per task, shared by the E layers
        self.e_prompts = nn.Parameter(
            torch.empty(num_tasks, len(c.e_layers), 2, c.e_length, self.embed_dim).uniform_(low, high))
        self.keys = nn.Parameter(torch.empty(num_tasks, self.embed_dim).uniform_(low, high))
        self.head = self.classifier(num_classes)
        timm_linear_init(self.head)  # the reference's ViT init of its new head
        self.register_buffer("seen_tasks", torch.tensor(0))  # checkpointed with the prompts

    def validate_for_backbone(self) -> None:
        self.require_layers_fit("prompt layers", self.config.g_layers + self.config.e_layers)

    def layer_prompts(self, slots: torch.Tensor) -> dict:
        """The G-prompt and each sample's E-prompt (``slots`` ``[B]``), per prompted block."""
        prompts = self.g_prompt.prompts(len(slots))
        chosen = self.e_prompts[slots]  # [B, layer, 2, length, D]
        if self.config.compat_reference_gather:
            keys, values = reference_batch_mixed_pairs(chosen.permute(1, 2, 0, 3, 4))  # [layer, B, length, D]
            chosen = torch.stack([keys, values], dim=2).transpose(0, 1)
        prompts.update({layer: prefix_prompt(chosen[:, i], self.num_heads)
                        for i, layer in enumerate(self.config.e_layers)})
        return prompts

    def features(self, images: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        return encode(self.backbone, images, self.layer_prompts(slots))

    def infer_slots(self, images: torch.Tensor) -> torch.Tensor:
        """Each sample's E-prompt: the seen task whose key is most similar to its query."""
        candidates = self.num_tasks if self.config.compat_match_all_keys else int(self.seen_tasks)
        similarity = cosine_similarity_matrix(self.frozen_features(images), self.keys[:candidates])
        slots = similarity.argmax(dim=1, keepdim=True)
        if self.config.batchwise_prompt:
            slots = batch_majority(slots, candidates)
        return slots[:, 0]

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images, self.infer_slots(images)))

    @torch.no_grad()
    def predict_with_details(self, images: torch.Tensor):
        slots = self.infer_slots(images)
        return self.seen_class_logits(self.head(self.features(images, slots))).argmax(-1), {"task": slots}

    # --- training ----------------------------------------------------------------------------
    def begin_task(self, task: TaskInfo) -> None:
        super().begin_task(task)
        self.seen_tasks.fill_(task.index + 1)
        if task.index > 0:
            with torch.no_grad():
                self.e_prompts[task.index] = self.e_prompts[task.index - 1]

    def phases(self, task: TaskInfo) -> list[Phase]:
        c = self.config
        groups = [{"params": [*self.g_prompt.parameters(), self.e_prompts, self.keys, *self.head.parameters()],
                   "lr": c.lr}]
        factor = norga_cub_schedule(task, c.epochs) if c.schedule == "norga_cub" else None
        return [Phase("train", c.epochs, groups, lr_factor=factor, grad_clip=c.grad_clip or None)]

    def training_loss(self, images, labels, task: TaskInfo, phase: Phase):
        t = task.index
        slots = torch.full((len(images),), t, dtype=torch.long, device=images.device)
        ce = F.cross_entropy(mask_logits(self.head(self.features(images, slots)), task.classes), labels)
        similarity = cosine_similarity_matrix(self.frozen_features(images), self.keys)
        pull = pull_constraint(similarity, slots[:, None])
        return ce + self.config.pull_weight * pull, {"ce": ce.detach().item(), "pull": pull.detach().item()}


# HiDe-Prompt's configs/*_sprompt_5e.py as MoE_PromptCL's scripts run them: no G-prompt, an E-prompt
# of 20 key + 20 value tokens in blocks 0-4, batch 128, lr 0.005 x 128 / 256.
SPROMPT_PP = dataclasses.replace(PAPER, g_layers=(), e_layers=(0, 1, 2, 3, 4), e_length=20, epochs=20,
                                 batch_size=128, lr=0.0025)


@register_method("sprompt++")
class SPromptPlusPlus(DualPrompt):
    """S-Prompt++ (HiDe-Prompt's class-incremental adaptation of S-Prompts, the "S-Prompt" rows of
    the HiDe-Prompt and NoRGa tables): DualPrompt's task-keyed E-prompts in blocks 0-4 and no
    G-prompt. promptcl's ``sprompt`` is the official S-Prompts (K-means centroids, prompt tuning)."""

    PRESETS = {"paper": SPROMPT_PP, "imagenet-r": dataclasses.replace(SPROMPT_PP, epochs=50),
               "5datasets": dataclasses.replace(SPROMPT_PP, e_length=40, pull_weight=0.5),
               "cub200": dataclasses.replace(SPROMPT_PP, epochs=50, schedule="norga_cub"),  # its CUB scripts: 50
               "small": dataclasses.replace(SMALL, g_layers=(), e_layers=(0, 1, 2))}
