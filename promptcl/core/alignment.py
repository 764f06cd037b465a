"""Per-class Gaussian feature statistics and classifier alignment by Gaussian feature replay.

Shared by SMoPE (diagonal covariance) and the HiDe/NoRGa family (full covariance): after a task,
store a Gaussian per class on frozen/prompted features; later retrain a head on samples drawn
from the Gaussians of all seen classes.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from promptcl.distributed import all_reduce_sum
from promptcl.methods.base import hold_then_cosine, mask_logits

Covariance = Literal["diag", "full"]
COV_EPS = 1e-4


class ClassGaussians(nn.Module):
    """Mean and covariance of the features of each class, kept as buffers (checkpointed)."""

    def __init__(self, num_classes: int, dim: int, covariance: Covariance = "diag") -> None:
        super().__init__()
        if covariance not in ("diag", "full"):
            raise ValueError(f"covariance must be 'diag' or 'full', got {covariance!r}")
        self.covariance = covariance
        self.register_buffer("mean", torch.zeros(num_classes, dim))
        cov_shape = (num_classes, dim) if covariance == "diag" else (num_classes, dim, dim)
        self.register_buffer("cov", torch.zeros(cov_shape))
        self.register_buffer("fitted", torch.zeros(num_classes, dtype=torch.bool))

    @torch.no_grad()
    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Store the Gaussian of every class present in ``labels`` (+ eps·I, as the references do).

        In a process group ``features``/``labels`` are this rank's shard: counts, sums and centred
        sums of squares (outer products for full covariance) are summed over ranks in float64, so
        every rank stores the statistics of the whole data, as one process would."""
        counts = all_reduce_sum(torch.bincount(labels, minlength=len(self.mean)).double())
        classes = counts.nonzero().flatten()
        if len(classes) == 0:
            return
        position = torch.full_like(counts, -1, dtype=torch.long)
        position[classes] = torch.arange(len(classes), device=classes.device)
        slot = position[labels]
        n = counts[classes]
        f = features.double()
        sums = all_reduce_sum(f.new_zeros(len(classes), f.shape[1]).index_add_(0, slot, f))
        means = sums / n[:, None]
        centred = f - means[slot]
        denominator = (n - 1).clamp(min=1)  # unbiased; a single sample gives zero spread
        if self.covariance == "diag":
            squares = all_reduce_sum(f.new_zeros(len(classes), f.shape[1]).index_add_(0, slot, centred ** 2))
            spread = squares / denominator[:, None] + COV_EPS
        else:
            outer = f.new_zeros(len(classes), f.shape[1], f.shape[1])
            for j in range(len(classes)):
                rows = centred[slot == j]
                outer[j] = rows.T @ rows
            all_reduce_sum(outer)
            eye = torch.eye(f.shape[1], dtype=f.dtype, device=f.device)
            spread = outer / denominator[:, None, None] + COV_EPS * eye
        self.mean[classes] = means.to(self.mean.dtype)
        self.cov[classes] = spread.to(self.cov.dtype)
        self.fitted[classes] = True

    @torch.no_grad()
    def sample(self, classes: range, per_class: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``per_class`` draws from each class in ``classes``, in class order (shuffle yourself)."""
        if not bool(self.fitted[classes.start:classes.stop].all()):
            raise RuntimeError("sampling from a class whose statistics were never fitted")
        feats, labels = [], []
        for c in classes:
            noise = torch.randn(per_class, self.mean.shape[1], generator=generator).to(self.mean)
            if self.covariance == "diag":
                draw = self.mean[c] + noise * self.cov[c].sqrt()
            else:
                draw = self.mean[c] + noise @ torch.linalg.cholesky(self.cov[c]).T
            feats.append(draw)
            labels.append(torch.full((per_class,), c, dtype=torch.long, device=self.mean.device))
        return torch.cat(feats), torch.cat(labels)


def align_head(
    head: nn.Module,
    gaussians: ClassGaussians,
    *,
    seen: range,
    iterations: int,
    epochs: int,
    samples_per_class: int,
    lr: float,
    min_lr: float,
    weight_decay: float,
    generator: torch.Generator,
    optimizer: Literal["adamw", "sgd"] = "adamw",
    cosine_per: Literal["iteration", "epoch"] = "iteration",
) -> None:
    """Retrain ``head`` on Gaussian replays of the ``seen`` classes.

    Each epoch draws ``samples_per_class`` features per seen class, shuffles them and runs
    ``iterations`` mini-batches of ``samples_per_class`` features (the references use the number
    of classes before the current task), with cross-entropy over the seen classes. The learning
    rate follows a cosine from ``lr`` to ``min_lr``, stepped per iteration (SMoPE) or per epoch
    (HiDe/NoRGa).
    """
    params = [p for p in head.parameters() if p.requires_grad]
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    factor = hold_then_cosine(0, min_lr / lr)
    if cosine_per == "iteration":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: factor(it, epochs * iterations))
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: factor(it // iterations, epochs))
    head.train()
    for _ in range(epochs):
        feats, labels = gaussians.sample(seen, samples_per_class, generator)
        order = torch.randperm(len(labels), generator=generator).to(labels.device)
        feats, labels = feats[order], labels[order]
        for i in range(iterations):
            chunk = slice(i * samples_per_class, (i + 1) * samples_per_class)
            if chunk.start >= len(labels):
                break
            logits = mask_logits(head(feats[chunk]), seen)
            loss = nn.functional.cross_entropy(logits, labels[chunk])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
