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
which hands each sample other samples' key/value halves, in training and at test time),
``compat_unmasked_test_logits`` (test-time argmax over every class, untrained rows included, as
dualprompt-pytorch, google-research/l2p and NoRGa's code take it: they mask the test logits only in
task-incremental runs) and ``compat_match_all_keys`` (the test-time key match also scores
untrained future tasks' keys).
The ``norga-*`` presets are the configs NoRGa's code base (Minhchuyentoancbn/MoE_PromptCL) runs
for the baselines of its table: batch 128 and lr 0.005 x 128 / 256.

The ``coda-*`` presets are CODA-Prompt's DualPrompt (GT-RIPL/CODA-Prompt ``models/zoo.py``, run with
``--prompt_param 10 20 6``; the SMoPE and VQ-Prompt code bases, built on CODA's, keep it and ship no
other): E-prompts of 10 + 10 tokens and G-prompts of 3 + 3, every E block its own keys
and its own top-1 pick at test time (``layer_keys``), each task's E-prompt started afresh,
U(0, 1) initialisation, PyTorch's head init, Adam at 1e-3 with CODA's cosine, batch 128, 20 epochs
(ImageNet-R 50), no gradient clipping. Its pull term is summed over the batch where ours is the
mean; only the keys take gradients from it, so Adam moves them alike. Its test-time match over every
key of the pool is ``compat_match_all_keys``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from promptcl.config import require, require_layers
from promptcl.core.backbone import encode
from promptcl.core.prompts import (SharedPrefix, batch_majority, cosine_similarity_matrix,
                                   prefix_prompt, pull_constraint, reference_batch_mixed_pairs)
from promptcl.methods import register_method
from promptcl.methods.base import Phase, PromptMethod, TaskInfo, mask_logits, timm_linear_init
from promptcl.methods.recipes import NORGA_BASELINE_SCRIPTS, BaselineSchedule, baseline_schedule


@dataclass(frozen=True, kw_only=True)
class DualPromptConfig:
    """Defaults: the Split CIFAR-100 config of the PyTorch port as it publishes its results: one GPU,
    batch 24, lr 0.03 x 24 / 256 (scaled by the per-device batch, as L2P's port)."""

    g_layers: tuple[int, ...] = (0, 1)
    g_length: int = 5  # key tokens (= value tokens) per G layer
    e_layers: tuple[int, ...] = (2, 3, 4)
    e_length: int = 5
    pull_weight: float = 1.0
    init_range: tuple[float, ...] = (-1.0, 1.0)
    epochs: int = 5
    batch_size: int = 24
    lr: float = 0.0028125
    grad_clip: float = 1.0
    schedule: BaselineSchedule = "constant"  # recipes.baseline_schedule
    layer_keys: bool = False  # each E block its own task keys and top-1 pick (CODA-Prompt's DualPrompt)
    start_from_previous: bool = True  # a new task's E-prompt starts from the previous task's (the port)
    head_init: Literal["timm", "pytorch"] = "timm"  # timm's ViT init (the port) or PyTorch's (CODA's)
    batchwise_prompt: bool = False
    compat_reference_gather: bool = False
    compat_unmasked_test_logits: bool = False
    compat_match_all_keys: bool = False

    def __post_init__(self) -> None:
        require_layers("e_layers", self.e_layers)
        require_layers("g_layers and e_layers together", self.g_layers + self.e_layers)  # g_layers may be empty
        require(self.g_length >= 1 and self.e_length >= 1, "g_length and e_length must be >= 1")
        require(self.schedule in get_args(BaselineSchedule),
                f"schedule must be one of {', '.join(get_args(BaselineSchedule))}, got {self.schedule!r}")
        require(self.head_init in ("timm", "pytorch"), f"head_init must be 'timm' or 'pytorch', got {self.head_init!r}")
        require(len(self.init_range) == 2 and self.init_range[0] < self.init_range[1],
                f"init_range must be (low, high) with low < high, got {self.init_range}")
        require(self.pull_weight >= 0 and self.grad_clip >= 0, "pull_weight and grad_clip must be >= 0")
        require(self.epochs >= 1 and self.batch_size >= 1 and self.lr > 0, "epochs, batch_size, lr must be positive")


PAPER = DualPromptConfig()
IMAGENET_R = dataclasses.replace(PAPER, e_length=20, epochs=50, lr=0.00046875)  # imr_dualprompt.py: 0.005 x 24 / 256
SMALL = dataclasses.replace(PAPER, g_layers=(0,), g_length=2, e_layers=(1, 2), e_length=2, epochs=6,
                             batch_size=32, lr=0.01)
# MoE_PromptCL configs/{cifar100,imr}_dualprompt.py as its scripts run them (--batch-size 128).
NORGA_CIFAR100 = dataclasses.replace(PAPER, e_length=20, epochs=20, batch_size=128, lr=0.0025)
NORGA_IMAGENET_R = dataclasses.replace(NORGA_CIFAR100, epochs=50)
# dualprompt-pytorch has no 5-datasets config; NoRGa's (configs/five_datasets_dualprompt.py) is the one:
# a pool of 5, 40-token E-prompts, 10-token G-prompts, pull 0.5 (its batch-wise vote: batchwise_prompt).
FIVE_DATASETS = dataclasses.replace(NORGA_CIFAR100, g_length=10, e_length=40, pull_weight=0.5)
CUB200 = dataclasses.replace(NORGA_CIFAR100, epochs=50, schedule="norga_cub")  # configs/cub_dualprompt.py
# CODA-Prompt's (experiments/cifar-100.sh, configs/cifar-100_prompt.yaml; imagenet-r: 50 epochs)
CODA_CIFAR100 = dataclasses.replace(PAPER, g_length=3, e_length=10, layer_keys=True, start_from_previous=False,
                                    init_range=(0.0, 1.0), head_init="pytorch", epochs=20, batch_size=128,
                                    lr=1e-3, schedule="coda_cosine", grad_clip=0.0)


@register_method("dualprompt")
class DualPrompt(PromptMethod):
    Config = DualPromptConfig
    PRESETS = {"paper": PAPER, "imagenet-r": IMAGENET_R, "5datasets": FIVE_DATASETS, "cub200": CUB200, "small": SMALL,
               "norga-cifar100": NORGA_CIFAR100, "norga-imagenet-r": NORGA_IMAGENET_R,
               "coda-cifar100": CODA_CIFAR100, "coda-imagenet-r": dataclasses.replace(CODA_CIFAR100, epochs=50)}
    SCRIPTS = NORGA_BASELINE_SCRIPTS
    SCRIPTED_PRESETS = ("5datasets",)  # NoRGa's 5-datasets config, the one its scripts run
    TEST_PASSES = 2
    INFERS_TASK = True
    REFERENCE_CODE_BASE = "hide"
    # dualprompt-pytorch and NoRGa's baseline configs (and S-Prompt++'s, HiDe's) load the original in21k
    # ViT-B_16.npz (the coda-* presets ran on other backbones: the manifest's rows name theirs)
    DEFAULT_BACKBONES = {name: "sup21k" for name in ("cifar100", "imagenet_r", "cub200", "five_datasets")}

    def __init__(self, config: DualPromptConfig, *, backbone: nn.Module, num_classes: int, num_tasks: int) -> None:
        super().__init__(config, backbone=backbone, num_classes=num_classes, num_tasks=num_tasks)
        c = config
        low, high = c.init_range
        self.g_prompt = SharedPrefix({layer: c.g_length for layer in c.g_layers}, self.embed_dim, self.num_heads)
        with torch.no_grad():
            for p in self.g_prompt.prefixes:
                p.uniform_(low, high)
        # [task, layer, key/value, length, D]; one key per task, shared by the E layers (or, with
        # layer_keys, one set per E layer: [layer, task, D])
        self.e_prompts = nn.Parameter(
            torch.empty(num_tasks, len(c.e_layers), 2, c.e_length, self.embed_dim).uniform_(low, high))
        key_shape = (len(c.e_layers), num_tasks, self.embed_dim) if c.layer_keys else (num_tasks, self.embed_dim)
        self.keys = nn.Parameter(torch.empty(key_shape).uniform_(low, high))
        self.head = self.classifier(num_classes)
        if c.head_init == "timm":
            timm_linear_init(self.head)  # the port's ViT init of its new head
        self.register_buffer("seen_tasks", torch.tensor(0))  # checkpointed with the prompts

    def validate_for_backbone(self) -> None:
        self.require_layers_fit("prompt layers", self.config.g_layers + self.config.e_layers)

    def key_sets(self) -> torch.Tensor:
        """The task keys ``[sets, task, D]``: one set shared by the E blocks, or one per E block."""
        return self.keys if self.config.layer_keys else self.keys[None]

    def layer_prompts(self, slots: torch.Tensor) -> dict:
        """The G-prompt and each sample's E-prompt per prompted block; ``slots``: ``[B]`` (the same
        task in every E block) or ``[E blocks, B]`` (a pick per block)."""
        num_layers = len(self.config.e_layers)
        per_layer = slots.expand(num_layers, -1) if slots.dim() == 1 else slots
        prompts = self.g_prompt.prompts(per_layer.shape[1])
        chosen = self.e_prompts[per_layer.T, torch.arange(num_layers, device=slots.device)]  # [B, layer, 2, length, D]
        if self.config.compat_reference_gather:
            keys, values = reference_batch_mixed_pairs(chosen.permute(1, 2, 0, 3, 4))  # [layer, B, length, D]
            chosen = torch.stack([keys, values], dim=2).transpose(0, 1)
        prompts.update({layer: prefix_prompt(chosen[:, i], self.num_heads)
                        for i, layer in enumerate(self.config.e_layers)})
        return prompts

    def features(self, images: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        return encode(self.backbone, images, self.layer_prompts(slots))

    def infer_slots(self, images: torch.Tensor) -> torch.Tensor:
        """Each sample's E-prompt: the seen task whose key is most similar to its query, ``[B]``
        (with ``layer_keys``, per E block: ``[E blocks, B]``)."""
        candidates = self.num_tasks if self.config.compat_match_all_keys else int(self.seen_tasks)
        query = self.frozen_features(images)
        picks = []
        for keys in self.key_sets():
            slots = cosine_similarity_matrix(query, keys[:candidates]).argmax(dim=1, keepdim=True)
            if self.config.batchwise_prompt:
                slots = batch_majority(slots, candidates)
            picks.append(slots[:, 0])
        return torch.stack(picks) if self.config.layer_keys else picks[0]

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images, self.infer_slots(images)))

    @torch.no_grad()
    def predict_with_details(self, images: torch.Tensor):
        slots = self.infer_slots(images)
        task = slots[0] if self.config.layer_keys else slots  # with a pick per block: the first E block's
        return self.seen_class_logits(self.head(self.features(images, slots))).argmax(-1), {"task": task}

    # --- training ----------------------------------------------------------------------------
    def begin_task(self, task: TaskInfo) -> None:
        super().begin_task(task)
        self.seen_tasks.fill_(task.index + 1)
        if task.index > 0 and self.config.start_from_previous:
            with torch.no_grad():
                self.e_prompts[task.index] = self.e_prompts[task.index - 1]

    def phases(self, task: TaskInfo) -> list[Phase]:
        c = self.config
        groups = [{"params": [*self.g_prompt.parameters(), self.e_prompts, self.keys, *self.head.parameters()],
                   "lr": c.lr}]
        factor = baseline_schedule(c.schedule, task, c.epochs)
        return [Phase("train", c.epochs, groups, lr_factor=factor, grad_clip=c.grad_clip or None)]

    def training_loss(self, images, labels, task: TaskInfo, phase: Phase):
        t = task.index
        slots = torch.full((len(images),), t, dtype=torch.long, device=images.device)
        ce = F.cross_entropy(mask_logits(self.head(self.features(images, slots)), task.classes), labels)
        query = self.frozen_features(images)
        pull = sum(pull_constraint(cosine_similarity_matrix(query, keys), slots[:, None])  # a term per key set
                   for keys in self.key_sets())
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
