"""One shared prefix for every task and sample (OVOR's OnePrompt shape), and the honest baselines
built on it: ``finetune`` (sequential training, no protection against forgetting) and ``joint``
(all seen tasks' data at once, the upper bound).

Same prompt, head and optimiser as OVOR (:mod:`promptcl.methods.ovor`) and, in the ``paper`` and
``imagenet-r`` presets, its total epochs, so the rows bracket it between forgetting and joint
training. finetune and OVOR differ in three things at once: OVOR's CE covers the current task's
classes only, and its last epochs train the head alone with the outlier term; OVOR with
``vor_epochs=0`` and finetune's ``epochs`` is finetune with the masking alone. (On the disk
benchmarks their default backbones and input pipelines differ too: pass the same ``--backbone``
and ``--protocol``.) One test pass: no query.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from promptcl.config import require, require_layers
from promptcl.core.backbone import encode
from promptcl.core.prompts import SharedPrefix
from promptcl.methods import register_method
from promptcl.methods.base import Phase, PromptMethod, TaskInfo, coda_cosine, mask_logits


@dataclass(frozen=True, kw_only=True)
class OnePromptConfig:
    """Defaults: the OnePrompt of OVOR's Split CIFAR-100 script (G 5+5 tokens in blocks 0-1, E 20+20
    in 2-4; Adam 1e-3, batch 128, CODA's cosine over the task's epochs) for OVOR's own 20 epochs
    (16 + 4): the script's plain OnePrompt run trains common.yaml's 50."""

    g_layers: tuple[int, ...] = (0, 1)
    g_length: int = 5  # key tokens (and as many value tokens) per G layer
    e_layers: tuple[int, ...] = (2, 3, 4)
    e_length: int = 20
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3

    def __post_init__(self) -> None:
        require_layers("g_layers and e_layers together", self.g_layers + self.e_layers)
        require(self.g_length >= 1 and self.e_length >= 1, "g_length and e_length must be >= 1")
        require(self.epochs >= 1 and self.batch_size >= 1, "epochs and batch_size must be >= 1")
        require(self.lr > 0, f"lr must be > 0, got {self.lr}")


PAPER = OnePromptConfig()
# Scaled to the small offline ViTs (4-6 blocks) and their benchmarks (tasks of 300-3,000 images).
SMALL_SHAPE = dict(g_layers=(0,), g_length=2, e_layers=(1, 2), e_length=4, batch_size=32, lr=0.01)
SMALL = dataclasses.replace(PAPER, epochs=6, **SMALL_SHAPE)


class OnePromptMethod(PromptMethod):
    """A shared prefix plus a linear head on the prompted [CLS]; subclasses choose which logits
    compete in the training loss and what data a task trains on."""

    Config = OnePromptConfig
    PRESETS = {"paper": PAPER, "imagenet-r": dataclasses.replace(PAPER, epochs=50), "small": SMALL}
    TEST_PASSES = 1

    def __init__(self, config: OnePromptConfig, *, backbone: nn.Module, num_classes: int, num_tasks: int) -> None:
        super().__init__(config, backbone=backbone, num_classes=num_classes, num_tasks=num_tasks)
        lengths = {**{layer: config.g_length for layer in config.g_layers},
                   **{layer: config.e_length for layer in config.e_layers}}
        self.prompt = SharedPrefix(lengths, self.embed_dim, self.num_heads)
        self.head = self.classifier(num_classes)

    def validate_for_backbone(self) -> None:
        self.require_layers_fit("prompt layers", self.config.g_layers + self.config.e_layers)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return encode(self.backbone, images, self.prompt.prompts(len(images)))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def phases(self, task: TaskInfo) -> list[Phase]:
        c = self.config
        groups = [{"params": list(self.prompt.parameters()) + list(self.head.parameters()), "lr": c.lr}]
        return [Phase("train", c.epochs, groups, lr_factor=coda_cosine(c.epochs))]

    def competing_classes(self, task: TaskInfo) -> range:
        """Head outputs the training loss normalises over."""
        return range(0, task.num_seen)

    def training_loss(self, images, labels, task: TaskInfo, phase: Phase):
        ce = F.cross_entropy(mask_logits(self.logits(images), self.competing_classes(task)), labels)
        return ce, {"ce": ce.detach().item()}


@register_method("finetune")
class Finetune(OnePromptMethod):
    """Sequential fine-tuning of the shared prompt and the head with cross-entropy over every
    class seen so far: nothing protects old tasks, so it shows how much is forgotten."""


@register_method("joint")
class Joint(OnePromptMethod):
    """Task t trains the shared prompt and head afresh on the data of tasks 0..t together (each row
    of the accuracy matrix is a model trained on all seen tasks at once): the upper bound."""

    TRAINS_ON_SEEN_TASKS = True

    def __init__(self, config: OnePromptConfig, *, backbone: nn.Module, num_classes: int, num_tasks: int) -> None:
        super().__init__(config, backbone=backbone, num_classes=num_classes, num_tasks=num_tasks)
        # The seeded initial state, restored before every task; kept out of checkpoints because
        # it is rebuilt identically from the run's seed.
        self._initial = {k: v.detach().clone() for k, v in self.checkpoint_state().items()}

    def begin_task(self, task: TaskInfo) -> None:
        super().begin_task(task)
        self.load_state_dict(self._initial, strict=False)
