"""Gates applied to the prefix (prompt) columns of the attention logits.

A gate maps the prompt-column scores ``s`` (shape ``[..., N, P]``) to new logits; the token
columns are never gated. One gate instance serves one prompted layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GATE_ACTIVATIONS = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "gelu": F.gelu}


class LinearGate(nn.Module):
    """Plain prefix tuning: the prompt logits enter the softmax unchanged."""

    is_linear = True

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return scores


class NoRGaGate(nn.Module):
    """NoRGa's non-linear residual gate ``s + alpha * act(tau * s)`` (Le et al., NeurIPS 2024).

    ``alpha`` and ``tau`` are learnable scalars (one pair per prompted layer).
    """

    is_linear = False

    def __init__(self, activation: str = "tanh", alpha: float = 1.0, tau: float = 1.0) -> None:
        super().__init__()
        if activation not in GATE_ACTIVATIONS:
            raise ValueError(
                f"unknown NoRGa activation {activation!r}; choose one of {sorted(GATE_ACTIVATIONS)}"
            )
        self.activation = activation
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))
        self.tau = nn.Parameter(torch.tensor(float(tau)))

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        act = GATE_ACTIVATIONS[self.activation]
        return scores + self.alpha * act(self.tau * scores)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"
