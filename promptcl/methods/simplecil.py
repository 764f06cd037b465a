"""SimpleCIL (Zhou et al., IJCV 2024, "Revisiting class-incremental learning with pre-trained models"):
no training at all. The frozen backbone's [CLS] features, one prototype (class mean) per class,
a cosine classifier. The floor every prompt method has to beat on a given backbone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from promptcl.config import require
from promptcl.core.alignment import ClassGaussians
from promptcl.methods import register_method
from promptcl.methods.base import Phase, PromptMethod, TaskInfo


@dataclass(frozen=True, kw_only=True)
class SimpleCILConfig:
    batch_size: int = 128  # of the prototype pass

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")


@register_method("simplecil")
class SimpleCIL(PromptMethod):
    Config = SimpleCILConfig
    PRESETS = {"paper": SimpleCILConfig(), "small": SimpleCILConfig(batch_size=32)}
    TEST_PASSES = 1

    def __init__(self, config: SimpleCILConfig, *, backbone: nn.Module, num_classes: int, num_tasks: int) -> None:
        super().__init__(config, backbone=backbone, num_classes=num_classes, num_tasks=num_tasks)
        # Only the means are used; the float64, rank-summed statistics make them exact on N ranks.
        self.prototypes = ClassGaussians(num_classes, self.embed_dim, covariance="diag")

    def phases(self, task: TaskInfo) -> list[Phase]:
        return []

    @torch.no_grad()
    def end_task(self, task: TaskInfo, train_batches, snapshot) -> None:
        self.eval()
        self.prototypes.fit(*self.collect_features(self.frozen_features, train_batches(), prompted=False))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Cosine similarity to every class prototype (unseen classes are masked by ``predict``)."""
        return F.normalize(self.frozen_features(images), dim=1) @ F.normalize(self.prototypes.mean, dim=1).T
