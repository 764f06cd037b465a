"""Prompt building blocks shared by the pool- and prefix-based methods.

- Prefix prompts kept in embedding space, ``[..., 2, length, embed_dim]`` (key half, value half),
  split into heads for the prefix-attention core (the L2P/DualPrompt/CODA layout).
- The frozen query is ``PromptMethod.frozen_features``: the un-prompted [CLS] feature of the same
  backbone (one extra pass, or none when a study's feature store already has it).
- Key-query matching by cosine similarity, per sample.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from promptcl.core.attention import LayerPrompt, static_prompt


def prefix_prompt(kv: torch.Tensor, num_heads: int, gate: Optional[nn.Module] = None) -> LayerPrompt:
    """A layer prompt from per-sample key/value prefixes ``[B, 2, length, embed_dim]``.

    The prefix is in the layer's key/value space (not passed through W_K/W_V), split into heads."""
    B, two, length, dim = kv.shape
    if two != 2 or dim % num_heads:
        raise ValueError(f"prefix must be [B, 2, length, embed_dim] with embed_dim divisible by "
                         f"{num_heads} heads, got {tuple(kv.shape)}")
    heads = kv.reshape(B, 2, length, num_heads, dim // num_heads).transpose(2, 3)  # [B, 2, H, length, d]
    return static_prompt(heads[:, 0], heads[:, 1], gate)


def reference_batch_mixed_pairs(kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) ``[L, B, ...]`` as dualprompt-pytorch's gather makes them from per-sample
    prefixes ``kv`` ``[L, 2, B, ...]``: a reshape to ``[L, B, 2, ...]`` where a permute was needed.
    Flattening (key/value, sample) row-major, sample b takes item 2b as its key and item 2b + 1 as
    its value, i.e. other samples' halves; the HiDe/NoRGa/DualPrompt reference code has this bug."""
    L, two, B = kv.shape[:3]
    pairs = kv.reshape(L, B, two, *kv.shape[3:])
    return pairs[:, :, 0], pairs[:, :, 1]


def cosine_similarity_matrix(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``[B, M]`` cosine similarities of each query to each key."""
    return F.normalize(query, dim=-1) @ F.normalize(keys, dim=-1).T


def top_keys(similarity: torch.Tensor, k: int) -> torch.Tensor:
    """``[B, k]`` indices of each sample's ``k`` most similar keys (ties: the lower index)."""
    if not 1 <= k <= similarity.shape[1]:
        raise ValueError(f"cannot pick {k} of {similarity.shape[1]} keys")
    return similarity.topk(k, dim=1, sorted=True).indices


def batch_majority(indices: torch.Tensor, pool_size: int) -> torch.Tensor:
    """The reference repos' ``batchwise_prompt``: every sample takes the ``k`` keys picked most
    often in its batch (ties: the lower index). Predictions then depend on the rest of the batch."""
    k = indices.shape[1]
    counts = torch.bincount(indices.flatten(), minlength=pool_size)
    # stable sort, so equal counts keep the lower index first
    chosen = torch.sort(counts, descending=True, stable=True).indices[:k]
    return chosen.unsqueeze(0).expand(len(indices), -1)


def pull_constraint(similarity: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
    """L2P/DualPrompt's surrogate loss: minus the mean (over samples) of the summed cosine
    similarity between each query and its picked keys; minimising it pulls the keys to the queries."""
    return -similarity.gather(1, picked).sum(dim=1).mean()


class SharedPrefix(nn.Module):
    """One key/value prefix per prompted layer, the same for every sample and task (DualPrompt's
    G-prompt; OVOR's OnePrompt). ``lengths`` maps layer -> prefix length (keys = values = length)."""

    def __init__(self, lengths: dict[int, int], embed_dim: int, num_heads: int) -> None:
        super().__init__()
        self.layers = tuple(sorted(lengths))
        self.num_heads = num_heads
        # uniform(0, 1), as CODA-Prompt's tensor_prompt (the OVOR and DualPrompt ports in its layout)
        self.prefixes = nn.ParameterList(nn.Parameter(torch.rand(2, lengths[layer], embed_dim))
                                         for layer in self.layers)

    def prompts(self, batch: int) -> dict[int, LayerPrompt]:
        return {layer: prefix_prompt(p.unsqueeze(0).expand(batch, -1, -1, -1), self.num_heads)
                for layer, p in zip(self.layers, self.prefixes)}
