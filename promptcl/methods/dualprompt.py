"""DualPrompt (Wang et al., ECCV 2022), after JH-LEE-KR/dualprompt-pytorch.

A G-prompt shared by all tasks (prefix in blocks 0-1) and one E-prompt per task (prefix in blocks
2-4) with a learnable key. Training uses the true task's E-prompt and pulls its key to the frozen
[CLS] query; at test time each sample takes the E-prompt whose key is most similar to its query
(top-1 among the tasks seen so far; the reference also scores untrained future keys). A new
task's E-prompt starts from the previous one's. The picked E-prompt is the inferred task, so the
run reports task-identity accuracy. Two backbone passes per image (query, then prompted).

``batchwise_prompt`` reproduces the reference's CIFAR-100 default, the whole test batch taking
its most voted E-prompt; the prefix gather itself is the correct one (the reference's
reshape-without-permute is not reproduced; see HiDe-Prompt's ``compat_reference_gather``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from promptcl.config import require, require_layers
from promptcl.core.backbone import encode
from promptcl.core.prompts import (SharedPrefix, batch_majority, cosine_similarity_matrix,
                                   prefix_prompt, pull_constraint)
from promptcl.methods import register_method
from promptcl.methods.base import Phase, PromptMethod, TaskInfo, mask_logits


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
    batchwise_prompt: bool = False

    def __post_init__(self) -> None:
        require_layers("e_layers", self.e_layers)
        require_layers("g_layers and e_layers together", self.g_layers + self.e_layers)
        require(self.g_length >= 1 and self.e_length >= 1, "g_length and e_length must be >= 1")
        require(len(self.init_range) == 2 and self.init_range[0] < self.init_range[1],
                f"init_range must be (low, high) with low < high, got {self.init_range}")
        require(self.pull_weight >= 0 and self.grad_clip >= 0, "pull_weight and grad_clip must be >= 0")
        require(self.epochs >= 1 and self.batch_size >= 1 and self.lr > 0, "epochs, batch_size, lr must be positive")


PAPER = DualPromptConfig()
IMAGENET_R = dataclasses.replace(PAPER, e_length=20, epochs=50, lr=0.00046875)
SMALL = dataclasses.replace(PAPER, g_layers=(0,), g_length=2, e_layers=(1, 2), e_length=2, epochs=6,
                             batch_size=32, lr=0.01)


@register_method("dualprompt")
class DualPrompt(PromptMethod):
    Config = DualPromptConfig
    PRESETS = {"paper": PAPER, "imagenet-r": IMAGENET_R, "small": SMALL}
    TEST_PASSES = 2
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
        self.head = nn.Linear(self.embed_dim, num_classes)
        self.register_buffer("seen_tasks", torch.tensor(0))  # checkpointed with the prompts

    def validate_for_backbone(self) -> None:
        self.require_layers_fit("prompt layers", self.config.g_layers + self.config.e_layers)

    def features(self, images: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        prompts = self.g_prompt.prompts(len(images))
        chosen = self.e_prompts[slots]  # [B, layer, 2, length, D]
        prompts.update({layer: prefix_prompt(chosen[:, i], self.num_heads)
                        for i, layer in enumerate(self.config.e_layers)})
        return encode(self.backbone, images, prompts)

    def infer_slots(self, images: torch.Tensor) -> torch.Tensor:
        """Each sample's E-prompt: the seen task whose key is most similar to its query."""
        similarity = cosine_similarity_matrix(self.frozen_features(images), self.keys[:int(self.seen_tasks)])
        slots = similarity.argmax(dim=1, keepdim=True)
        if self.config.batchwise_prompt:
            slots = batch_majority(slots, int(self.seen_tasks))
        return slots[:, 0]

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images, self.infer_slots(images)))

    @torch.no_grad()
    def predict_with_details(self, images: torch.Tensor):
        slots = self.infer_slots(images)
        logits = mask_logits(self.head(self.features(images, slots)), range(0, self.seen_classes))
        return logits.argmax(-1), {"task": slots}

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
        return [Phase("train", c.epochs, groups, grad_clip=c.grad_clip or None)]

    def training_loss(self, images, labels, task: TaskInfo, phase: Phase):
        t = task.index
        slots = torch.full((len(images),), t, dtype=torch.long, device=images.device)
        ce = F.cross_entropy(mask_logits(self.head(self.features(images, slots)), task.classes), labels)
        similarity = cosine_similarity_matrix(self.frozen_features(images), self.keys)
        pull = pull_constraint(similarity, slots[:, None])
        return ce + self.config.pull_weight * pull, {"ce": ce.detach().item(), "pull": pull.detach().item()}
