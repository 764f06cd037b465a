"""CODA-Prompt (Smith et al., CVPR 2023), after GT-RIPL/CODA-Prompt.

Per prompted block (0-4): M prompt components P_m, keys K_m and attention vectors A_m. A sample's
prompt is ``sum_m alpha_m P_m`` with ``alpha_m = cos(q * A_m, K_m)`` for its frozen [CLS] query q
(no softmax), split into key and value prefix halves. Each task owns M / T components: they are
initialised by Gram-Schmidt orthogonal to all earlier ones, trained during their task, and used
detached (frozen) afterwards. An orthogonality penalty on K, A and P is available; every shipped
script sets its weight to 0 (the Gram-Schmidt initialisation does the work). Two passes per image.

The code subtracts a new component's projection onto each earlier one separately, which is exact
only while the earlier ones are orthogonal; training makes them drift, so its new components are
only roughly orthogonal to the old. Here they are orthogonal to the span of the earlier ones;
``compat_reference_gram_schmidt`` reproduces the code's procedure.
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
from promptcl.methods.base import Phase, PromptMethod, TaskInfo, coda_cosine, mask_logits


@dataclass(frozen=True, kw_only=True)
class CODAConfig:
    """Defaults: experiments/cifar-100.sh (--prompt_param 100 8 0.0) and its yaml."""

    pool_size: int = 100
    prompt_length: int = 4  # key tokens (= value tokens): the code's length 8, halved
    prompt_layers: tuple[int, ...] = (0, 1, 2, 3, 4)
    ortho_weight: float = 0.0
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    compat_reference_gram_schmidt: bool = False  # the code's per-row projection (module docstring)

    def __post_init__(self) -> None:
        require(self.pool_size >= 1 and self.prompt_length >= 1, "pool_size and prompt_length must be >= 1")
        require_layers("prompt_layers", self.prompt_layers)
        require(self.ortho_weight >= 0, f"ortho_weight must be >= 0, got {self.ortho_weight}")
        require(self.epochs >= 1 and self.batch_size >= 1 and self.lr > 0, "epochs, batch_size, lr must be positive")


PAPER = CODAConfig()
SMALL = dataclasses.replace(PAPER, pool_size=20, prompt_length=2, prompt_layers=(0, 1, 2), epochs=6,
                             batch_size=32, lr=0.01)


def orthogonality_penalty(rows: torch.Tensor) -> torch.Tensor:
    """``mean((R R^T - I)^2)`` of the rows flattened: zero exactly for orthonormal rows."""
    flat = rows.flatten(1)
    eye = torch.eye(len(flat), device=flat.device, dtype=flat.dtype)
    return ((flat @ flat.T - eye) ** 2).mean()


def gram_schmidt_rows(matrix: torch.Tensor, start: int, stop: int, generator: torch.Generator,
                      reference: bool = False) -> torch.Tensor:
    """A copy of ``matrix`` (rows flattened) with rows ``start:stop`` replaced by random unit vectors
    orthogonal to the span of every earlier row and to each other, and the rows after ``stop``
    zeroed. ``reference``: CODA's procedure instead, each draw minus its projection onto every
    earlier row taken separately (earlier new rows included), normalised at the end. Computed on the
    CPU in float64, where ``generator`` draws, so a seed gives the same rows on every device."""
    flat = matrix.detach().flatten(1).double().cpu()
    out = flat.clone()
    out[stop:] = 0
    if reference:
        require(bool((flat[:start].square().sum(1) >= 1e-8).all()),
                "an earlier component has (near) zero norm: the reference would redraw forever")
        for i in range(start, stop):
            v = torch.randn(flat.shape[1], generator=generator, dtype=torch.float64)
            earlier = out[:i]
            out[i] = v - (earlier @ v / earlier.square().sum(1)) @ earlier
        out[start:stop] = F.normalize(out[start:stop], dim=1)
    else:
        basis = torch.linalg.qr(flat[:start].T).Q if start else flat.new_zeros(flat.shape[1], 0)
        for i in range(start, stop):
            v = torch.randn(flat.shape[1], generator=generator, dtype=torch.float64)
            for _ in range(2):  # twice is enough for orthogonality to rounding
                v = v - basis @ (basis.T @ v)
            v = F.normalize(v, dim=0)
            basis = torch.cat([basis, v[:, None]], dim=1)
            out[i] = v
    return out.to(matrix.device, matrix.dtype).reshape(matrix.shape)


@register_method("coda")
class CODAPrompt(PromptMethod):
    Config = CODAConfig
    # The pool is split evenly over the tasks: 4 components per task on 5 tasks and on 3.
    PRESETS = {"paper": PAPER, "imagenet-r": dataclasses.replace(PAPER, epochs=50), "small": SMALL,
               "small-3tasks": dataclasses.replace(SMALL, pool_size=12)}
    TEST_PASSES = 2
    REFERENCE_CODE_BASE = "coda"
    # The code pins timm 0.4.12, whose vit_base_patch16_224 is AugReg in21k -> in1k (not timm 1.x's AugReg2).
    DEFAULT_BACKBONES = {"cifar100": "sup1k_augreg", "imagenet_r": "sup1k_augreg"}

    def __init__(self, config: CODAConfig, *, backbone: nn.Module, num_classes: int, num_tasks: int) -> None:
        super().__init__(config, backbone=backbone, num_classes=num_classes, num_tasks=num_tasks)
        c = config
        L, M, D = len(c.prompt_layers), c.pool_size, self.embed_dim
        require(M % num_tasks == 0, f"pool_size {M} must be a multiple of the {num_tasks} tasks")
        self.per_task = M // num_tasks
        self.components = nn.Parameter(torch.zeros(L, M, 2, c.prompt_length, D))
        self.keys = nn.Parameter(torch.zeros(L, M, D))
        self.attention = nn.Parameter(torch.zeros(L, M, D))
        self.head = self.classifier(num_classes)
        self.register_buffer("active", torch.tensor(0))  # components in use: (tasks seen) x per_task

    def validate_for_backbone(self) -> None:
        self.require_layers_fit("prompt_layers", self.config.prompt_layers)
        require(self.config.pool_size <= self.embed_dim,
                f"pool_size {self.config.pool_size} exceeds the {self.embed_dim} dimensions its components "
                f"must be orthogonal in")

    def begin_task(self, task: TaskInfo) -> None:
        super().begin_task(task)
        start, stop = task.index * self.per_task, (task.index + 1) * self.per_task
        generator = torch.Generator().manual_seed(torch.initial_seed() + task.index)
        with torch.no_grad():
            for param in (self.components, self.keys, self.attention):
                for layer in range(len(param)):
                    param[layer] = gram_schmidt_rows(param[layer], start, stop, generator,
                                                      self.config.compat_reference_gram_schmidt)
        self.active.fill_(stop)

    def pool(self, param: torch.Tensor, trainable_from: int) -> torch.Tensor:
        """The active rows of ``param`` ([layer, M, ...]), earlier tasks' rows detached."""
        stop = int(self.active)
        return torch.cat([param[:, :trainable_from].detach(), param[:, trainable_from:stop]], dim=1)

    def features(self, images: torch.Tensor, trainable_from: int | None = None) -> torch.Tensor:
        """Prompted [CLS] features; components before ``trainable_from`` are used detached."""
        start = int(self.active) if trainable_from is None else trainable_from
        P, K, A = (self.pool(p, start) for p in (self.components, self.keys, self.attention))
        query = self.frozen_features(images)
        # alpha[l, b, m] = cos(q_b * A_lm, K_lm), without materialising q * A: [layer, B, M]
        numerator = torch.einsum("bd,lmd->lbm", query, A * F.normalize(K, dim=-1))
        norm = torch.einsum("bd,lmd->lbm", query.square(), A.square()).sqrt().clamp_min(1e-12)
        composed = torch.einsum("lbm,lmkpd->lbkpd", numerator / norm, P)  # [layer, B, 2, length, D]
        prompts = {layer: prefix_prompt(composed[i], self.num_heads)
                   for i, layer in enumerate(self.config.prompt_layers)}
        return encode(self.backbone, images, prompts)

    def orthogonality_loss(self, trainable_from: int) -> torch.Tensor:
        """The penalty on the active K, A and P of every layer (earlier tasks' rows detached)."""
        return sum(orthogonality_penalty(rows[i]) for p in (self.keys, self.attention, self.components)
                   for rows in [self.pool(p, trainable_from)] for i in range(len(rows)))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def phases(self, task: TaskInfo) -> list[Phase]:
        c = self.config
        groups = [{"params": [self.components, self.keys, self.attention, *self.head.parameters()], "lr": c.lr}]
        return [Phase("train", c.epochs, groups, lr_factor=coda_cosine(c.epochs))]

    def training_loss(self, images, labels, task: TaskInfo, phase: Phase):
        start = task.index * self.per_task
        ce = F.cross_entropy(mask_logits(self.head(self.features(images, start)), task.classes), labels)
        if self.config.ortho_weight == 0:
            return ce, {"ce": ce.detach().item()}
        ortho = self.orthogonality_loss(start)
        return ce + self.config.ortho_weight * ortho, {"ce": ce.detach().item(), "ortho": ortho.detach().item()}
