"""S-Prompts (Wang et al., NeurIPS 2022), the class-incremental adaptation of the official code
(iamwangyabin/S-Prompts, domain-incremental).

Each task trains its own prompt (tokens inserted after [CLS] at the input, without a position
embedding) and its own classifier (a separate head over the task's classes), with SGD. After the
task, K-means on the task's L2-normalised frozen [CLS] features gives K centroids. A test image goes
to the task of its nearest centroid over all seen tasks (L1 distance, as the code computes it)
and is classified among that task's classes. Two passes per test image, one per training image.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from promptcl.config import require
from promptcl.core.alignment import kmeans
from promptcl.core.backbone import encode_tokens
from promptcl.distributed import gather_in_order
from promptcl.methods import register_method
from promptcl.methods.base import Phase, PromptMethod, TaskInfo, mask_logits, per_epoch


@dataclass(frozen=True, kw_only=True)
class SPromptConfig:
    """Defaults: the official recipe (10 prompt tokens, K = 5, SGD 0.01 with cosine, weight decay
    5e-4 on the first task and 2e-4 after, batch 128); 20 epochs, the low end of its configs."""

    prompt_length: int = 10
    centroids_per_task: int = 5
    centroid_distance: Literal["l1", "l2"] = "l1"
    epochs: int = 20
    batch_size: int = 128
    lr: float = 0.01
    first_task_weight_decay: float = 5e-4
    weight_decay: float = 2e-4
    # The code clusters the augmented training images; by default K-means reads the test-time pipeline.
    compat_augmented_statistics: bool = False

    def __post_init__(self) -> None:
        require(self.prompt_length >= 1 and self.centroids_per_task >= 1,
                "prompt_length and centroids_per_task must be >= 1")
        require(self.centroid_distance in ("l1", "l2"),
                f"centroid_distance must be l1 or l2, got {self.centroid_distance!r}")
        require(self.epochs >= 1 and self.batch_size >= 1 and self.lr > 0, "epochs, batch_size, lr must be positive")
        require(self.weight_decay >= 0 and self.first_task_weight_decay >= 0, "weight decays must be >= 0")


PAPER = SPromptConfig()
SMALL = dataclasses.replace(PAPER, prompt_length=4, epochs=6, batch_size=32, lr=0.05)


def kmeans_centroids(features: torch.Tensor, k: int) -> torch.Tensor:
    """scikit-learn's K-means (``random_state=0``, 10 starts, as the code), on CPU float64."""
    return kmeans(features, k, seed=0, n_init=10)[0]


@register_method("sprompt")
class SPrompt(PromptMethod):
    Config = SPromptConfig
    PRESETS = {"paper": PAPER, "small": SMALL}
    TEST_PASSES = 2
    # the official code's vit_base_patch16_224 (every benchmark) is AugReg in21k fine-tuned on in1k
    DEFAULT_BACKBONES = {name: "sup1k_augreg" for name in ("cifar100", "imagenet_r", "cub200", "five_datasets")}
    INFERS_TASK = True
    REFERENCE_CODE_BASE = "hide"

    def __init__(self, config: SPromptConfig, *, backbone: nn.Module, num_classes: int, num_tasks: int) -> None:
        super().__init__(config, backbone=backbone, num_classes=num_classes, num_tasks=num_tasks)
        c, D = config, self.embed_dim
        # One prompt and one classifier per task, separate parameters so that a task's optimiser
        # (momentum, weight decay) never touches another task's. PyTorch's Linear init, as the code.
        bound = 1 / math.sqrt(D)
        self.prompts = nn.ParameterList(nn.Parameter(torch.empty(c.prompt_length, D).uniform_(-bound, bound))
                                        for _ in range(num_tasks))
        require(num_classes % num_tasks == 0, f"{num_classes} classes do not split into {num_tasks} equal tasks")
        self.heads = nn.ModuleList(self.classifier(num_classes // num_tasks) for _ in range(num_tasks))
        self.register_buffer("centroids", torch.zeros(num_tasks, c.centroids_per_task, D))
        self.register_buffer("seen_tasks", torch.tensor(0))

    def features(self, images: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
        prompts = torch.stack(list(self.prompts))[tasks]  # [B, length, D]
        tokens = encode_tokens(self.backbone, images, input_tokens=prompts, input_tokens_positioned=False)
        return self.backbone.forward_head(tokens, pre_logits=True)

    def all_logits(self, features: torch.Tensor) -> torch.Tensor:
        return torch.cat([head(features) for head in self.heads], dim=1)

    def infer_tasks(self, images: torch.Tensor) -> torch.Tensor:
        """The task of each sample's nearest centroid among the seen tasks."""
        query = F.normalize(self.frozen_features(images), dim=1)
        seen = self.centroids[:int(self.seen_tasks)]  # [T, K, D]
        p = 1 if self.config.centroid_distance == "l1" else 2
        # (direct differences: past 25 rows cdist's L2 default uses a matmul form whose rounding
        # depends on the batch, see vqprompt.quantise)
        distance = torch.cdist(query, seen.flatten(0, 1), p=p, compute_mode="donot_use_mm_for_euclid_dist")
        distance = distance.reshape(len(query), *seen.shape[:2])
        return distance.min(dim=2).values.argmin(dim=1)

    def task_logits(self, images: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
        """Each sample's logits from its task's prompt and classifier (other classes -inf)."""
        logits = self.all_logits(self.features(images, tasks))
        per_task = logits.shape[1] // self.num_tasks
        own = torch.arange(logits.shape[1], device=logits.device)[None] // per_task == tasks[:, None]
        return logits.masked_fill(~own, float("-inf"))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.task_logits(images, self.infer_tasks(images))

    @torch.no_grad()
    def predict_with_details(self, images: torch.Tensor):
        tasks = self.infer_tasks(images)
        return self.task_logits(images, tasks).argmax(-1), {"task": tasks}

    # --- training ----------------------------------------------------------------------------
    def begin_task(self, task: TaskInfo) -> None:
        super().begin_task(task)
        self.seen_tasks.fill_(task.index + 1)  # its centroids are filled in by end_task

    def phases(self, task: TaskInfo) -> list[Phase]:
        c, t = self.config, task.index
        groups = [{"params": [self.prompts[t], *self.heads[t].parameters()], "lr": c.lr}]
        cosine = per_epoch(lambda e, n: 0.5 * (1 + math.cos(math.pi * e / n)), c.epochs)
        return [Phase("train", c.epochs, groups, optimizer="sgd", lr_factor=cosine,
                      weight_decay=c.first_task_weight_decay if t == 0 else c.weight_decay)]

    def training_loss(self, images, labels, task: TaskInfo, phase: Phase):
        tasks = torch.full((len(images),), task.index, dtype=torch.long, device=images.device)
        logits = self.all_logits(self.features(images, tasks))
        ce = F.cross_entropy(mask_logits(logits, task.classes), labels)
        return ce, {"ce": ce.detach().item()}

    @torch.no_grad()
    def end_task(self, task: TaskInfo, train_batches, snapshot) -> None:
        self.eval()
        augmented = self.augmented_statistics()
        feats, _ = self.collect_features(lambda x: F.normalize(self.frozen_features(x, storable=not augmented), dim=1),
                                         train_batches(augmented=augmented), prompted=False)
        centroids = kmeans_centroids(gather_in_order(feats), self.config.centroids_per_task)
        # fewer distinct points than K: repeat the last centroid (a duplicate never changes the min)
        padded = torch.cat([centroids, centroids[-1:].expand(self.config.centroids_per_task - len(centroids), -1)])
        self.centroids[task.index] = padded.to(self.centroids.device)
