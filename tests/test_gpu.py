"""Every method on a CUDA device computes what it computes on the CPU, through a task's whole life
(begin_task, a training loss and its gradients, end_task, test logits). Catches a tensor left on
the wrong device and device-dependent arithmetic. Skipped without CUDA: the GPU machine runs it
(README, Performance)."""

import sys
from pathlib import Path

import pytest
import torch

from promptcl.data.benchmarks import load_dataset
from promptcl.methods import method_names
from promptcl.methods.base import TaskInfo
from test_methods import T, make

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


def task_zero_batches():
    """The first task (digits 0 and 1) of the digits training set, as two batches."""
    train = load_dataset("digits").train
    pairs = [train[i] for i in range(len(train)) if int(train[i][1]) in (0, 1)][:64]
    images = torch.stack([p[0] for p in pairs])
    labels = torch.tensor([int(p[1]) for p in pairs])
    return [(images[:32], labels[:32]), (images[32:], labels[32:])]


def one_task(name: str, device: str, batches, seed: int = 0):
    """(loss, {parameter: gradient}, logits) of a freshly built method on ``device``."""
    task = TaskInfo(0, range(0, 2), T)
    method = make(name).to(device)  # built on the CPU from the seed, then moved: the same init
    method.begin_task(task)
    phases = method.phases(task)
    loss, grads = None, {}
    if phases:
        method.train()
        method.backbone.eval()
        torch.manual_seed(seed)
        images, labels = batches[0]
        loss, _ = method.training_loss(images.to(device), labels.to(device), task, phases[0])
        loss.backward()
        grads = {n: p.grad.cpu() for n, p in method.named_parameters() if p.grad is not None}
        method.zero_grad(set_to_none=True)
        loss = loss.item()
    method.eval()
    method.end_task(task, lambda augmented=False: batches, lambda name: None)
    with torch.no_grad():
        logits = method.logits(batches[1][0].to(device)).cpu()
    return loss, grads, logits


def assert_near(ours: torch.Tensor, reference: torch.Tensor, tolerance: float) -> None:
    """Equal within ``tolerance`` of the largest magnitude; masked (-inf) logits masked alike."""
    finite = torch.isfinite(reference)
    assert torch.equal(torch.isfinite(ours), finite) and torch.equal(ours[~finite], reference[~finite])
    ours, reference = ours[finite], reference[finite]
    scale = reference.abs().max().clamp_min(1.0)
    error = ((ours - reference).abs().max() / scale).item()
    assert error <= tolerance, f"largest difference {error:.2e} of the largest magnitude"


@pytest.mark.parametrize("name", sorted(method_names()))
def test_a_method_computes_on_cuda_what_it_computes_on_the_cpu(name, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the patch embedding in full fp32
    batches = task_zero_batches()
    loss, grads, logits = one_task(name, "cuda", batches)
    cpu_loss, cpu_grads, cpu_logits = one_task(name, "cpu", batches)
    # A loss that draws random numbers (noisy routing, dropout) draws other ones on the GPU: its
    # loss and gradients are not compared (such a loss is found on the CPU: two seeds, two losses).
    stochastic = cpu_loss is not None and one_task(name, "cpu", batches, seed=1)[0] != cpu_loss
    if cpu_loss is not None and not stochastic:
        assert loss == pytest.approx(cpu_loss, rel=1e-4, abs=1e-5)
        assert grads.keys() == cpu_grads.keys() and grads
        for n in grads:
            assert_near(grads[n], cpu_grads[n], 1e-3)
    # No optimizer step was taken: end_task's fits (statistics, task identity, alignment) start from
    # the same parameters on both devices.
    assert_near(logits, cpu_logits, 1e-3)


def test_prompted_step_times_gpu_kernels_without_launch_gaps():
    import prompted_step

    report = prompted_step.main(["--backbone", "vit_digits", "--batch", "4", "--repeats", "1", "--methods", "smope",
                                 "--bf16", "--device", "cuda", "--clock", "kernels"])
    assert report["clock"] == "kernels" and report["device"] == "cuda"
    assert report["plain_forward_ms"] > 0 and all(r["forward_ratio"] > 0 for r in report["rows"])
