"""Cost accounting: trainable/total parameters and train/test FLOPs per image.

:func:`train_flops_per_run` turns them into the training FLOPs of a whole run, from the work the
engine counted (images per training phase, end-of-task passes).

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode``, a multiply-add as 2 FLOPs (a
ViT-B/16 pass at 224 px: 35.13 GFLOPs, the 17.6 G multiply-adds most papers quote). Its registry
has no formula for the CPU SDPA kernel, which would count attention as zero, so one is registered here; every
forward pass a method needs at test time is counted (``predict`` runs them all). Counting runs the
reference (eager) prefix-attention path: the fused one pads each query and key with the prefix
logits' coordinates, arithmetic of the kernel layout, not of the method.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from promptcl.core.attention import prefix_attention_impl
from promptcl.core.backbone import build_backbone, encode
from promptcl.methods.base import TaskInfo

aten = torch.ops.aten


def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


CPU_SDPA_FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward,
}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of everything ``fn`` runs (forward and, if it calls it, backward).

    SDPA runs as its math decomposition here, so fused and explicit attention (the gated prefix
    path) are counted by the same matmul rules, backward included; the CPU formulas cover any
    kernel that is dispatched anyway."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FORMULAS) as counter:
        fn()
    return int(counter.get_total_flops())


def parameter_counts(method) -> dict[str, int]:
    trainable = sum(p.numel() for p in method.trainable_parameters())
    total = sum(p.numel() for p in method.parameters())
    return {"trainable_params": trainable, "total_params": total}


def measure_cost(method_cls, config, backbone: str, num_classes: int,
                 image_shape: tuple[int, int, int], *, num_tasks: int = 10) -> dict[str, int]:
    """Parameters and per-image FLOPs of a method, on a fresh random-init copy (no training).

    Parameters count everything the method trains over a whole sequence of ``num_tasks`` tasks.
    """
    with prefix_attention_impl("eager"):
        return _measure_cost(method_cls, config, backbone, num_classes, image_shape, num_tasks=num_tasks)


def _measure_cost(method_cls, config, backbone: str, num_classes: int,
                  image_shape: tuple[int, int, int], *, num_tasks: int) -> dict[str, int]:
    vit = build_backbone(backbone, img_size=image_shape[-1])  # the token count follows the image size
    method = method_cls(config, backbone=vit, num_classes=num_classes, num_tasks=num_tasks)
    out = parameter_counts(method)
    task = TaskInfo(index=0, classes=range(0, num_classes), num_tasks=1)
    method.begin_task(task)
    phases = method.phases(task)
    batch = 2
    images = torch.randn(batch, *image_shape)
    labels = torch.zeros(batch, dtype=torch.long)

    def train_step(phase) -> None:
        method.train()
        vit.eval()
        loss, _ = method.training_loss(images, labels, task, phase)
        loss.backward()
        method.zero_grad(set_to_none=True)

    by_phase = {phase.name: count_flops(lambda: train_step(phase)) // batch for phase in phases}
    method.eval()
    with torch.no_grad():
        out["backbone_flops_per_image"] = count_flops(lambda: encode(vit, images[:1]))
        out["test_flops_per_image"] = count_flops(lambda: method.predict(images[:1]))
    # the main (last) phase's step; a training-free method (e.g. class means) encodes each image once
    out["train_flops_per_image"] = by_phase[phases[-1].name] if phases else out["backbone_flops_per_image"]
    out["train_flops_per_image_by_phase"] = by_phase
    # one prompted pass (what end-of-task statistics make): the test forward less its frozen passes
    out["prompted_pass_flops_per_image"] = (out["test_flops_per_image"]
                                            - (method_cls.TEST_PASSES - 1) * out["backbone_flops_per_image"])
    out["test_passes"] = method_cls.TEST_PASSES
    return out


def train_flops_per_run(cost: dict[str, Any], work: dict[str, Any]) -> int:
    """FLOPs of a run's training: every training step (images seen per phase × that phase's step per
    image) and every end-of-task backbone pass (frozen: task-identity and query features, prototypes;
    prompted: class statistics), all tasks. Un-counted: fits on features (task-identity MLP, Gaussian
    replay, K-means); the largest, HiDe/NoRGa's re-alignment of the task-identity MLP, is up to a
    quarter of one backbone pass per training image (CUB-200; about 0.2 % of the run's count). A
    study's feature store saves some frozen passes; this counts the method's own work, with or
    without one."""
    steps = sum(images * cost["train_flops_per_image_by_phase"][name] for name, images in work["phase_images"].items())
    return int(steps + work["frozen_pass_images"] * cost["backbone_flops_per_image"]
               + work["prompted_pass_images"] * cost["prompted_pass_flops_per_image"])
