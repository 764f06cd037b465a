"""Task-identity inference (TII), HiDe-Prompt's first stage.

A frozen, un-prompted backbone gives [CLS] features; a residual MLP and a head over all classes
learn to tell the classes (hence the tasks) apart, with per-task masked cross-entropy, per-class
statistics of the frozen features (full-covariance Gaussians, as NoRGa's scripts, or HiDe's
multi-centroid mixtures), and realignment on Gaussian replays of every seen class from the second
task on. Un-augmented frozen features depend only on (backbone,
dataset, transform): they are computed once per task's images and reused across epochs; the
reference's training on augmented images takes a fresh pass per epoch (HiDe's ``tii_augmented``).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from promptcl.core.alignment import Statistics, align_head, class_statistics
from promptcl.methods.base import mask_logits


class ResidualMLP(nn.Module):
    """``x + MLP(x)`` then LayerNorm. ``structure`` lists hidden widths as multiples of ``dim``:
    ``(2,)`` is Linear(d, 2d)-GELU-Linear(2d, d); ``(4, 4)`` is Linear(d, 4d)-GELU-Linear(4d, 4d)-
    LayerNorm(4d)-Linear(4d, d), the reference's 5-datasets variant. ``norm``: the final norm, where the
    backbone hands one over (MoCo v3: the reference's ``fc_norm`` takes the MLP's norm's place)."""

    def __init__(self, dim: int, structure: tuple[int, ...], norm: Optional[nn.Module] = None) -> None:
        super().__init__()
        if not structure or any(h < 1 for h in structure):
            raise ValueError(f"MLP structure must be positive multiples of the width, got {structure}")
        widths = [dim * h for h in structure]
        layers: list[nn.Module] = [nn.Linear(dim, widths[0]), nn.GELU()]
        for w_in, w_out in zip(widths, widths[1:]):
            layers += [nn.Linear(w_in, w_out), nn.LayerNorm(w_out)]
        layers.append(nn.Linear(widths[-1], dim))
        self.mlp = nn.Sequential(*layers)
        self.norm = norm if norm is not None else nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.mlp(x))


class TaskIdentifier(nn.Module):
    """Residual MLP + linear head over all classes, on frozen backbone features."""

    def __init__(self, dim: int, num_classes: int, structure: tuple[int, ...], *,
                 statistics: Statistics = "covariance", centroids: int = 10,
                 final_norm: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.mlp = ResidualMLP(dim, structure, final_norm)
        self.head = nn.Linear(dim, num_classes)
        self.stats = class_statistics(statistics, num_classes, dim, centroids)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.mlp(features))

    def fit_task(self, epoch_features: Callable[[], tuple[torch.Tensor, torch.Tensor]], classes: range, *,
                 epochs: int, batch_size: int, lr: float, grad_clip: float, generator: torch.Generator) -> None:
        """Masked CE on one task's frozen features, with a fresh Adam, as the reference does;
        ``epoch_features()`` gives each epoch's (features, labels): a fresh pass over augmented
        images, or the same tensors every epoch."""
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=lr)
        self.train()
        for _ in range(epochs):
            features, labels = epoch_features()
            order = torch.randperm(len(labels), generator=generator).to(labels.device)
            for start in range(0, len(labels), batch_size):
                idx = order[start:start + batch_size]
                loss = F.cross_entropy(mask_logits(self(features[idx]), classes), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, grad_clip)
                opt.step()
        self.eval()

    def realign(self, *, seen: range, iterations: int, epochs: int, samples_per_class: int, lr: float,
                generator: torch.Generator) -> None:
        """Realign MLP + head on Gaussian replays of the seen classes (SGD, per-epoch cosine)."""
        align_head(self, self.stats, seen=seen, iterations=iterations, epochs=epochs,
                   samples_per_class=samples_per_class, lr=lr, min_lr=0.0, weight_decay=0.0,
                   generator=generator, optimizer="sgd", cosine_per="epoch")
        self.eval()
