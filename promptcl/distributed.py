"""Data-parallel CL across processes: shards, gradient sync and exact statistic reductions.

Every function acts on ``torch.distributed``'s default group when one is initialised (Ray Train
sets it up on every worker, at any world size) and is the identity in a plain process, so one
code path serves N = 1 and N > 1. Ranks see strided shards of each dataset (``rank::world``, no
padding duplicates), so sums over ranks are sums over the dataset, exactly.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import BatchSampler, Sampler


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def check_divisible(batch_size: int, num_workers: int, what: str = "batch_size") -> None:
    """The method's batch size is the global one; each of N ranks takes batch_size / N."""
    if num_workers < 1:
        raise ValueError(f"the number of workers must be >= 1, got {num_workers}")
    if batch_size % num_workers:
        raise ValueError(f"{what}={batch_size} is not divisible by {num_workers} workers "
                         f"(the global batch is split evenly across workers)")


class ShardedBatchSampler(Sampler[list[int]]):
    """The global batches of ``sampler`` (``batch_size`` each), of which this rank keeps every
    ``world``-th index starting at ``rank``. All ranks draw the same global order (same generator),
    so together they see exactly the batches a single process sees. A rank whose share of the last
    batch is empty yields one batch fewer (see :func:`global_steps`). ``drop_last``: the last
    partial global batch is left out (as some references train)."""

    def __init__(self, sampler: Sampler[int], batch_size: int, rank: int, world_size: int,
                 drop_last: bool = False) -> None:
        self.batches = BatchSampler(sampler, batch_size, drop_last=drop_last)
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            share = batch[self.rank::self.world_size]
            if share:
                yield share

    def __len__(self) -> int:
        n, b = len(self.batches.sampler), self.batches.batch_size
        full, last = divmod(n, b)
        # a batch smaller than the world leaves ranks b, b+1, ... with empty shares of every batch
        return (full if self.rank < b else 0) + (1 if last > self.rank and not self.batches.drop_last else 0)

    def global_steps(self) -> int:
        return len(self.batches)


def shard(indices: Sequence[int]) -> list[int]:
    """This rank's strided share of ``indices``."""
    rank, size = world()
    return list(indices[rank::size])


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (float64 is the caller's choice for statistics)."""
    if world()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_in_order(tensor: torch.Tensor) -> torch.Tensor:
    """Rows of strided shards (rank r held rows r, r + N, ...) put back in their global order."""
    rank, size = world()
    if size == 1:
        return tensor
    counts = torch.tensor([len(tensor)], device=tensor.device)
    sizes = [torch.zeros_like(counts) for _ in range(size)]
    dist.all_gather(sizes, counts)
    sizes = [int(s) for s in sizes]
    longest = max(sizes)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: len(tensor)] = tensor
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded)
    out = tensor.new_empty((sum(sizes), *tensor.shape[1:]))
    for r, (part, n) in enumerate(zip(parts, sizes)):
        out[r::size] = part[:n]
    return out


def sync_gradients(params: Iterable[nn.Parameter], local_count: int) -> None:
    """Make every rank's gradients those of the loss averaged over the whole global batch.

    Each rank's loss is a mean over its ``local_count`` samples, so ``grad * local_count`` summed
    over ranks, divided by the summed counts, is the gradient of the global mean. A parameter no
    rank produced a gradient for keeps ``grad=None`` (optimizers then skip it, as in one process).
    """
    if world()[1] == 1:
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    device = params[0].device
    flat = [torch.tensor([float(local_count)], dtype=torch.float64, device=device)]
    for p in params:
        has = p.grad is not None
        flat.append(torch.tensor([1.0 if has else 0.0], dtype=torch.float64, device=device))
        flat.append((p.grad.detach().double() * local_count).flatten() if has
                    else torch.zeros(p.numel(), dtype=torch.float64, device=device))
    buffer = torch.cat(flat)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    total = buffer[0].item()
    offset = 1
    for p in params:
        has = buffer[offset].item() > 0
        grad = buffer[offset + 1: offset + 1 + p.numel()]
        offset += 1 + p.numel()
        p.grad = (grad / total).view_as(p).to(p.dtype) if has else None


def broadcast_from_main(tensors: Iterable[torch.Tensor]) -> None:
    """Rank 0's values of ``tensors`` (in place) on every rank: guards against replicated
    after-task work diverging across ranks (e.g. non-deterministic GPU kernels)."""
    if world()[1] == 1:
        return
    for tensor in tensors:
        if tensor.dtype == torch.bool:  # gloo has no bool broadcast
            as_bytes = tensor.to(torch.uint8)
            dist.broadcast(as_bytes, src=0)
            tensor.copy_(as_bytes.bool())
        else:
            dist.broadcast(tensor, src=0)
