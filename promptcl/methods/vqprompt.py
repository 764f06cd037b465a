"""VQ-Prompt (Jiao et al., NeurIPS 2024), after the official code (jiaolifengmi/VQ-Prompt).

Per prompted block (0-4): a pool of prompts with keys. The frozen [CLS] query q weighs the pool,
``alpha = softmax(q . normalize(K) / tau)``; the continuous prompt ``p = sum alpha_i P_i`` is
quantised to its nearest pool prompt Q (squared L2), and the forward pass uses Q through the
straight-through estimator ``p + sg(Q - p)``, so the task loss reaches alpha (hence the keys) and
the whole pool. Two codebook terms tie p and Q. After each task, per-class diagonal Gaussians of
the prompted features, and (task >= 1) the head realigned on Gaussian replays, as in the code's
default ``adaptive_pred``. Two passes per image, at training and at test time.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from promptcl.config import require, require_layers
from promptcl.core.backbone import encode
from promptcl.core.prompts import prefix_prompt
from promptcl.methods import register_method
from promptcl.methods.base import Phase, PromptMethod, TaskInfo, mask_logits
from promptcl.methods.recipes import AlignedRecipe


@dataclass(frozen=True, kw_only=True)
class VQPromptConfig(AlignedRecipe):
    """Defaults: the official Split CIFAR-100 config (--prompt_param 10 8 1, cifar-100_prompt_vq.yaml)."""

    pool_size: int = 10
    prompt_length: int = 4  # key tokens (= value tokens): the code's length 8, halved
    prompt_layers: tuple[int, ...] = (0, 1, 2, 3, 4)
    temperature: float = 1.0
    codebook_weight: float = 0.4  # pulls the continuous prompt to sg(Q) (the code's "vq_loss")
    commitment_weight: float = 0.1  # pulls Q to sg(continuous prompt) (the code's "commit_loss")
    lr: float = 0.0025
    ca_epochs: int = 10
    ca_samples_per_class: int = 512  # batch_size x 4

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.pool_size >= 1 and self.prompt_length >= 1, "pool_size and prompt_length must be >= 1")
        require_layers("prompt_layers", self.prompt_layers)
        require(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        require(self.codebook_weight >= 0 and self.commitment_weight >= 0, "codebook weights must be >= 0")


PAPER = VQPromptConfig()
IMAGENET_R = dataclasses.replace(PAPER, batch_size=64, lr_hold_iters=40, ca_samples_per_class=256)
# imnet-r_prompt_{short,long}_vq.yaml (5 and 20 tasks): the learning rate held 80 and 20 iterations
IMAGENET_R_5 = dataclasses.replace(IMAGENET_R, lr_hold_iters=80)
IMAGENET_R_20 = dataclasses.replace(IMAGENET_R, lr_hold_iters=20)
# configs/cub-200_prompt_vq.yaml + experiments/cub-200.sh: CODA's per-epoch cosine over 20 epochs,
# --ca_batch_size_ratio 2 (128 x 2 replays per class), --prompt_param 10 8 5 (softmax temperature 5)
CUB200 = dataclasses.replace(PAPER, schedule="epoch-cosine", lr_hold_iters=0, ca_samples_per_class=256,
                             temperature=5.0)
SMALL = dataclasses.replace(PAPER, prompt_layers=(0, 1, 2), prompt_length=2, pool_size=8, epochs=6, batch_size=32,
                             lr=0.01, lr_hold_iters=0, ca_epochs=20, ca_samples_per_class=32, ca_lr=1e-3,
                             ca_min_lr=1e-5)


def quantise(continuous: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """The pool entry nearest (squared L2 over the whole prompt) to each continuous prompt.
    ``continuous`` ``[B, ...]``, ``pool`` ``[N, ...]`` -> ``[B, ...]``. Each distance is summed
    from its own differences: cdist's default switches to ``|x|^2 + |y|^2 - 2 x.y`` past 25 rows,
    whose cancellation flips near ties (a mix of pool entries lies between them), so the entry a
    prompt got depended on how many others shared its batch."""
    nearest = torch.cdist(continuous.flatten(1), pool.flatten(1), compute_mode="donot_use_mm_for_euclid_dist")
    nearest = nearest.argmin(dim=1)
    return pool[nearest]


@register_method("vqprompt")
class VQPrompt(PromptMethod):
    Config = VQPromptConfig
    PRESETS = {"paper": PAPER, "imagenet-r": IMAGENET_R, "imagenet-r-5tasks": IMAGENET_R_5,
               "imagenet-r-20tasks": IMAGENET_R_20, "cub200": CUB200, "small": SMALL}
    TEST_PASSES = 2
    REFERENCE_CODE_BASE = "coda"

    def __init__(self, config: VQPromptConfig, *, backbone: nn.Module, num_classes: int, num_tasks: int) -> None:
        super().__init__(config, backbone=backbone, num_classes=num_classes, num_tasks=num_tasks)
        c, L = config, len(config.prompt_layers)
        self.pool = nn.Parameter(torch.rand(L, c.pool_size, 2, c.prompt_length, self.embed_dim))
        self.keys = nn.Parameter(torch.rand(L, c.pool_size, self.embed_dim))
        self.head = self.classifier(num_classes)
        self.class_stats = config.class_statistics(num_classes, self.embed_dim)

    def validate_for_backbone(self) -> None:
        self.require_layers_fit("prompt_layers", self.config.prompt_layers)

    def quantised_prompts(self, query: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per prompted layer, the prefix ``[B, 2, length, D]`` the forward pass uses (its values are
        a pool entry; its gradient flows to the continuous prompt), and the codebook loss summed
        over the layers."""
        c = self.config
        alpha = (torch.einsum("bd,lmd->lbm", query, F.normalize(self.keys, dim=-1)) / c.temperature).softmax(-1)
        continuous = torch.einsum("lbm,lmkpd->lbkpd", alpha, self.pool)  # [layer, B, 2, length, D]
        used, codebook = [], query.new_zeros(())
        for layer in range(len(c.prompt_layers)):
            quantised = quantise(continuous[layer], self.pool[layer])
            used.append(continuous[layer] + (quantised - continuous[layer]).detach())  # straight-through
            codebook = codebook + (c.codebook_weight * F.mse_loss(continuous[layer], quantised.detach())
                                   + c.commitment_weight * F.mse_loss(quantised, continuous[layer].detach()))
        return used, codebook

    def features(self, images: torch.Tensor, *, storable: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompted [CLS] features, the codebook loss); ``storable``: as :meth:`frozen_features`."""
        used, codebook = self.quantised_prompts(self.frozen_features(images, storable=storable))
        prompts = {layer: prefix_prompt(used[i], self.num_heads) for i, layer in enumerate(self.config.prompt_layers)}
        return encode(self.backbone, images, prompts), codebook

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images)[0])

    # --- training ----------------------------------------------------------------------------
    def phases(self, task: TaskInfo) -> list[Phase]:
        groups, schedule = self.config.param_groups([self.pool, self.keys], self.head, self.config.epochs)
        return [Phase("train", self.config.epochs, groups, lr_factor=schedule)]

    def training_loss(self, images, labels, task: TaskInfo, phase: Phase):
        feats, codebook = self.features(images)
        ce = F.cross_entropy(mask_logits(self.head(feats), task.classes), labels)
        return ce + codebook, {"ce": ce.detach().item(), "codebook": codebook.detach().item()}

    @torch.no_grad()
    def end_task(self, task: TaskInfo, train_batches, snapshot) -> None:
        self.eval()
        augmented = self.augmented_statistics()
        self.class_stats.fit(*self.collect_features(lambda x: self.features(x, storable=not augmented)[0],
                                                    train_batches(augmented=augmented), prompted=True))
        self.config.align(self.head, self.class_stats, task, snapshot)
        self.eval()
