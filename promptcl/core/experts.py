"""SMoPE's sparse prompt experts (Le et al., ICLR 2026).

Per prompted layer and head there are ``E`` experts, each one prefix key and one prefix value
(``head_dim`` each). A sample's proxy score for expert ``j`` is the mean query over all its tokens
dotted with the expert key; each head picks its top-k experts per sample, and the selected
experts enter the attention with the token-shared logit ``score / sqrt(head_dim)``. Usage counts,
"frequently used" flags and the keys snapshotted at the end of the previous task are buffers, so
checkpoints keep them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from promptcl.core.attention import LayerPrompt, Prefix
from promptcl.distributed import all_reduce_sum

RoutingMode = Literal["sparse", "dense"]


@dataclass
class Routing:
    """What one forward pass routed, per prompted layer (in ``layers`` order)."""

    scores: list[torch.Tensor] = field(default_factory=list)  # raw proxy scores [B, H, E]
    selected: list[torch.Tensor] = field(default_factory=list)  # noisy top-k indices [B, H, K]


class SparsePromptExperts(nn.Module):
    def __init__(self, *, layers: tuple[int, ...], num_heads: int, head_dim: int, num_experts: int,
                 top_k: int, noise_scale: float, exclude_unused_when_clean: bool = False) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
        self.layers = tuple(layers)
        self.top_k = top_k
        self.noise_scale = noise_scale
        self.exclude_unused_when_clean = exclude_unused_when_clean  # the reference's evaluation-mode quirk
        shape = (len(layers), num_heads, num_experts, head_dim)
        # Uniform [0, 1) initialisation, as in the reference (CODA-style tensor prompts).
        self.keys = nn.Parameter(torch.rand(shape))
        self.values = nn.Parameter(torch.rand(shape))
        self.register_buffer("usage", torch.zeros(shape[:3]))
        self.register_buffer("frequent", torch.zeros(shape[:3], dtype=torch.bool))
        self.register_buffer("old_keys", torch.zeros(shape))

    @property
    def num_experts(self) -> int:
        return self.keys.shape[2]

    def prompts(self, mode: RoutingMode, *, noisy: bool, routing: Routing) -> dict[int, LayerPrompt]:
        """Per-layer prompts for one forward; ``routing`` collects scores and selections."""
        return {layer: self._layer_prompt(i, mode, noisy, routing) for i, layer in enumerate(self.layers)}

    def _layer_prompt(self, i: int, mode: RoutingMode, noisy: bool, routing: Routing) -> LayerPrompt:
        def prompt(q: torch.Tensor) -> Prefix:
            keys, values = self.keys[i], self.values[i]  # [H, E, d]
            scores = torch.einsum("bhd,hed->bhe", q.mean(dim=2), keys)  # [B, H, E]
            scale = q.shape[-1] ** -0.5
            B = q.shape[0]
            if mode == "dense":
                routing.scores.append(scores)
                return Prefix(values=values.unsqueeze(0).expand(B, -1, -1, -1), logits=scores * scale)
            unused = self.usage[i] == 0 if self.exclude_unused_when_clean and not noisy else None
            selected = self.select(scores, self.frequent[i] if noisy else None, unused)
            routing.scores.append(scores)
            routing.selected.append(selected)
            picked_values = torch.gather(
                values.unsqueeze(0).expand(B, -1, -1, -1), 2,
                selected.unsqueeze(-1).expand(-1, -1, -1, values.shape[-1]),
            )
            return Prefix(values=picked_values, logits=torch.gather(scores, 2, selected) * scale)

        return prompt

    def select(self, scores: torch.Tensor, frequent: torch.Tensor | None,
               unused: torch.Tensor | None = None) -> torch.Tensor:
        """Top-k experts per sample and head; frequently used experts are pushed down by
        ``noise_scale`` times the sample's score range (the adaptive "noise"), and ``unused`` ones
        (``[H, E]``, the reference's evaluation quirk) by twice the range."""
        selection = scores.detach()
        spread = selection.amax(-1, keepdim=True) - selection.amin(-1, keepdim=True)
        if frequent is not None and self.noise_scale > 0 and bool(frequent.any()):
            selection = selection - self.noise_scale * spread * frequent.to(selection.dtype)
        if unused is not None and bool(unused.any()):
            selection = selection - 2 * spread * unused.to(selection.dtype)
        return selection.topk(self.top_k, dim=-1).indices

    def router_loss(self, routing: Routing) -> torch.Tensor:
        """Selected experts must out-score the rest by a margin of ``noise_scale`` × score range."""
        total = routing.scores[0].new_zeros(())
        for scores, selected in zip(routing.scores, routing.selected):
            spread = (scores.amax(-1, keepdim=True) - scores.amin(-1, keepdim=True)).detach()
            chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, selected, True)
            margined = scores + self.noise_scale * spread * (~chosen).to(scores.dtype)
            log_prob = torch.gather(scores, -1, selected) - margined.logsumexp(-1, keepdim=True)
            total = total - log_prob.mean(0).sum()  # mean over the batch, sum over heads and k
        return total

    def prototype_loss(self) -> torch.Tensor:
        """Old frequently used keys must still route to the experts the old keys routed them to."""
        old = self.old_keys
        target = torch.einsum("lhpd,lhed->lhpe", old, old).topk(self.top_k, dim=-1).indices
        log_prob = torch.einsum("lhpd,lhed->lhpe", old, self.keys).log_softmax(-1)
        per_prototype = -torch.gather(log_prob, -1, target).sum(-1)  # [L, H, E]
        flags = self.frequent.to(per_prototype.dtype)
        return ((per_prototype * flags).sum(-1) / flags.sum(-1).clamp(min=1)).sum()

    @torch.no_grad()
    def count_usage(self, routing: Routing) -> None:
        """Add each sample's clean top-k of the raw scores per (layer, head), as the reference counts
        (so with the unused-expert exclusion on, what changes is the later layers' inputs)."""
        for i, scores in enumerate(routing.scores):
            selected = scores.topk(self.top_k, dim=-1).indices
            counts = torch.zeros_like(self.usage[i]).scatter_add_(
                -1, selected.permute(1, 0, 2).reshape(selected.shape[1], -1),
                torch.ones(selected.shape[1], selected.shape[0] * selected.shape[2], device=selected.device),
            )
            self.usage[i] += counts

    @torch.no_grad()
    def sum_usage_over_ranks(self, before: torch.Tensor) -> None:
        """Usage counted since ``before`` (a copy of ``usage``) on each rank's shard, summed over
        ranks in float64: every rank then holds the counts of the whole pass."""
        added = all_reduce_sum((self.usage - before).double())
        self.usage.copy_(before + added.to(self.usage.dtype))

    @torch.no_grad()
    def begin_task(self, threshold: Literal["used", "all"]) -> None:
        """Snapshot keys and (sticky) flag the frequently used experts from the usage so far."""
        self.old_keys.copy_(self.keys)
        if threshold == "all":
            mean = self.usage.mean(-1, keepdim=True)
        else:  # the reference code: mean over experts that were used at least once
            used = (self.usage > 0).to(self.usage.dtype)
            mean = self.usage.sum(-1, keepdim=True) / used.sum(-1, keepdim=True).clamp(min=1)
        self.frequent |= (self.usage >= mean) & (self.usage > 0)
