"""Per-class feature statistics and classifier alignment by Gaussian feature replay.

Shared by SMoPE (diagonal covariance) and the HiDe/NoRGa family (full covariance, or HiDe's own
per-class K-means mixture of diagonal Gaussians): after a task, store the statistics of each class
on frozen/prompted features; later retrain a head on samples drawn from those of all seen classes.
"""

from __future__ import annotations

from typing import Literal, Optional, get_args

import numpy as np
import torch
from torch import nn

from promptcl.distributed import all_reduce_sum, broadcast_from_main, gather_in_order, is_main
from promptcl.methods.base import hold_then_cosine, mask_logits

Covariance = Literal["diag", "full"]
# The HiDe-Prompt code base's ``ca_storage_efficient_method``: one full-covariance Gaussian, one
# diagonal Gaussian, or K-means clusters with a diagonal Gaussian each.
Statistics = Literal["covariance", "variance", "multi-centroid"]
STATISTICS = get_args(Statistics)
COV_EPS = 1e-4


class ClassGaussians(nn.Module):
    """Mean and covariance of the features of each class, kept as buffers (checkpointed); the unbiased
    estimate, or with ``unbiased=False`` the population one (``np.var``, as SMoPE's code base)."""

    def __init__(self, num_classes: int, dim: int, covariance: Covariance = "diag", *, unbiased: bool = True) -> None:
        super().__init__()
        if covariance not in ("diag", "full"):
            raise ValueError(f"covariance must be 'diag' or 'full', got {covariance!r}")
        self.covariance = covariance
        self.unbiased = unbiased
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
        denominator = (n - 1).clamp(min=1) if self.unbiased else n  # a single sample gives zero spread
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

    def means(self, classes: range) -> torch.Tensor:
        """``[rows, dim]``: the stored mean of each class in ``classes``."""
        return self.mean[classes.start:classes.stop]

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


def kmeans(features: torch.Tensor, k: int, *, seed: int, n_init: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's K-means (k-means++ seeding) on CPU float64: (centres ``[k', D]``, cluster of each
    row). ``k`` drops to the number of distinct rows when there are fewer."""
    from sklearn.cluster import KMeans

    data = features.detach().double().cpu().numpy()
    k = min(k, len(np.unique(data, axis=0)))
    fitted = KMeans(n_clusters=k, random_state=seed, n_init=n_init).fit(data)
    return torch.from_numpy(fitted.cluster_centers_).to(features.dtype), torch.from_numpy(fitted.labels_).long()


class ClassCentroids(nn.Module):
    """HiDe-Prompt's ``multi-centroid`` statistics: K-means on each class's features (``centroids``
    clusters; 10 k-means++ starts, the default of the scikit-learn it pins; seeded by the run) and
    a diagonal Gaussian per cluster (mean, population variance, + eps·I when sampled, as the
    reference). Replays draw ``per_class`` samples from every cluster of a class whose variance is
    not all zero (the reference skips single-point clusters); the contrastive term reads every
    cluster mean.

    Stored as buffers (checkpointed): ``mean``/``var`` ``[classes, centroids, dim]``, ``present``
    (the cluster was fitted; fewer distinct features than ``centroids`` fit fewer) and ``fitted``.
    """

    def __init__(self, num_classes: int, dim: int, centroids: int = 10) -> None:
        super().__init__()
        if centroids < 1:
            raise ValueError(f"centroids must be >= 1, got {centroids}")
        self.register_buffer("mean", torch.zeros(num_classes, centroids, dim))
        self.register_buffer("var", torch.zeros(num_classes, centroids, dim))
        self.register_buffer("present", torch.zeros(num_classes, centroids, dtype=torch.bool))
        self.register_buffer("fitted", torch.zeros(num_classes, dtype=torch.bool))

    @torch.no_grad()
    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Cluster every class present in ``labels``. In a process group ``features``/``labels`` are
        this rank's shard: rank 0 clusters the gathered whole and every rank takes its result."""
        features, labels = gather_in_order(features), gather_in_order(labels)
        classes = torch.unique(labels).tolist()
        if is_main():
            for c in classes:
                rows = features[labels == c].double()
                # one seed per (run, class): K-means restarts differ across seeds, repeat within one
                _, cluster = kmeans(rows, self.mean.shape[1], seed=(torch.initial_seed() + c) % 2**32, n_init=10)
                self.present[c] = False
                for j in range(int(cluster.max()) + 1):
                    members = rows[cluster.to(rows.device) == j]
                    if len(members) == 0:  # K-means may end with an empty cluster: nothing to store
                        continue
                    self.mean[c, j] = members.mean(0).to(self.mean.dtype)
                    self.var[c, j] = members.var(0, unbiased=False).to(self.var.dtype)
                    self.present[c, j] = True
        self.fitted[classes] = True
        broadcast_from_main([self.mean, self.var, self.present])

    def means(self, classes: range) -> torch.Tensor:
        """``[rows, dim]``: every fitted cluster mean of the classes in ``classes``."""
        part = slice(classes.start, classes.stop)
        return self.mean[part][self.present[part]]

    @torch.no_grad()
    def sample(self, classes: range, per_class: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``per_class`` draws from each sampled cluster of each class in ``classes``, in class then
        cluster order (shuffle yourself)."""
        if not bool(self.fitted[classes.start:classes.stop].all()):
            raise RuntimeError("sampling from a class whose statistics were never fitted")
        feats, labels = [], []
        for c in classes:
            sampled = self.present[c] & (self.var[c].mean(-1) > 0)
            means, spread = self.mean[c][sampled], (self.var[c][sampled] + COV_EPS).sqrt()
            noise = torch.randn(len(means), per_class, self.mean.shape[-1], generator=generator).to(self.mean)
            feats.append((means[:, None] + noise * spread[:, None]).flatten(0, 1))
            labels.append(torch.full((len(means) * per_class,), c, dtype=torch.long, device=self.mean.device))
        return torch.cat(feats), torch.cat(labels)


def class_statistics(kind: Statistics, num_classes: int, dim: int, centroids: int = 10) -> nn.Module:
    """The per-class statistics of the HiDe-Prompt code base's ``ca_storage_efficient_method``."""
    if kind == "covariance":
        return ClassGaussians(num_classes, dim, covariance="full")
    if kind == "variance":
        return ClassGaussians(num_classes, dim, covariance="diag")
    if kind == "multi-centroid":
        return ClassCentroids(num_classes, dim, centroids)
    raise ValueError(f"unknown class statistics {kind!r}; choose one of {list(STATISTICS)}")


def align_head(
    head: nn.Module,
    gaussians: ClassGaussians | ClassCentroids,
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
    first_step_lr: Optional[float] = None,
) -> None:
    """Retrain ``head`` on Gaussian replays of the ``seen`` classes.

    Each epoch draws ``samples_per_class`` features per seen class, shuffles them and runs
    ``iterations`` mini-batches of ``samples_per_class`` features (the references use the number
    of classes before the current task), with cross-entropy over the seen classes. The learning
    rate follows a cosine from ``lr`` to ``min_lr``, stepped per iteration (SMoPE) or per epoch
    (HiDe/NoRGa); ``first_step_lr``, if given, is the first step's rate, the cosine following one step
    late (SMoPE's and VQ-Prompt's scheduler, which sets the group's rate first; per iteration only).
    """
    if first_step_lr is not None and cosine_per != "iteration":
        raise ValueError("first_step_lr applies to the per-iteration cosine only")
    params = [p for p in head.parameters() if p.requires_grad]
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    cosine = hold_then_cosine(0, min_lr / lr)

    def factor(it: int) -> float:
        if first_step_lr is not None:
            return first_step_lr / lr if it == 0 else cosine(it - 1, epochs * iterations)
        return cosine(it, epochs * iterations) if cosine_per == "iteration" else cosine(it // iterations, epochs)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
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
