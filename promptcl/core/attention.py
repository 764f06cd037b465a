"""The one prefix-attention core every prompt method goes through.

A prompted layer receives a :class:`LayerPrompt`: given the layer's queries it returns a
:class:`Prefix` (per-sample prefix keys/values, or token-shared prefix logits) and a gate. The
prefix columns and the token columns are joined in ONE softmax. ``PrefixAttention`` and
``PromptBlock`` subclass timm's ``Attention``/``Block`` so pretrained weights load unchanged.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Literal, Optional, Protocol

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block
from torch import nn


@dataclass(frozen=True)
class Prefix:
    """Prefix experts of one layer, gathered per sample.

    values: ``[B, H, P, head_dim]``, in head-value space (not passed through W_V).
    keys: ``[B, H, P, head_dim]``; every query token scores them as ``q · k / sqrt(d)``.
    logits: ``[B, H, P]`` token-shared prefix logits (SMoPE), used instead of ``keys``.
    gate: applied to the prefix logits only; ``None`` means the linear gate.
    """

    values: torch.Tensor
    keys: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    gate: Optional[nn.Module] = None

    def __post_init__(self) -> None:
        if (self.keys is None) == (self.logits is None):
            raise ValueError("a Prefix takes exactly one of keys or logits")
        if self.values.dim() != 4:
            raise ValueError(f"prefix values must be [B, H, P, head_dim], got {tuple(self.values.shape)}")
        scores = self.keys if self.keys is not None else self.logits
        if scores.shape[:3] != self.values.shape[:3]:
            raise ValueError(
                f"prefix keys/logits {tuple(scores.shape)} do not match values {tuple(self.values.shape)}"
            )


class LayerPrompt(Protocol):
    """What a method hands to one prompted layer: the prefix, possibly computed from the queries."""

    def __call__(self, q: torch.Tensor) -> Prefix: ...


PrefixAttentionImpl = Literal["auto", "merged", "fused", "eager"]
_IMPL: PrefixAttentionImpl = "auto"


@contextlib.contextmanager
def prefix_attention_impl(impl: PrefixAttentionImpl) -> Iterator[None]:
    """Choose how gated and token-shared prefixes are computed: ``merged`` (the token columns through
    the flash kernel, merged exactly with the explicit prefix columns; where that kernel exists, else
    ``fused``), ``fused`` (one SDPA call over widened heads), ``eager`` (the explicit softmax, the
    reference path) or ``auto``: ``merged`` on the CPU, where it is measured fastest, ``fused``
    elsewhere (on CUDA ``merged`` awaits its measurement; see README "Performance")."""
    global _IMPL
    if impl not in ("auto", "merged", "fused", "eager"):
        raise ValueError(f"unknown prefix attention implementation {impl!r}; choose auto, merged, fused or eager")
    previous, _IMPL = _IMPL, impl
    try:
        yield
    finally:
        _IMPL = previous


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix: Optional[Prefix],
    *,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Attention of ``q`` over ``[prefix; tokens]`` in one softmax. Shapes ``[B, H, N, head_dim]``.

    Prefix keys and values (fp32 parameters) join the tokens' in the tokens' dtype: under bf16
    autocast a concatenation would otherwise promote the whole [B, H, P + N, d] tensor to fp32,
    which SDPA's autocast then casts back (the same numbers, three times the memory traffic)."""
    if prefix is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    _check_prefix(prefix, q)
    gate = prefix.gate
    if prefix.keys is not None and (gate is None or getattr(gate, "is_linear", False)):
        # Linear gate with per-token scores is exactly SDPA over the concatenated keys/values.
        keys = torch.cat([prefix.keys.to(k.dtype), k], dim=2)
        values = torch.cat([prefix.values.to(v.dtype), v], dim=2)
        return F.scaled_dot_product_attention(q, keys, values, dropout_p=dropout_p)

    scale = q.shape[-1] ** -0.5
    if prefix.keys is not None:
        prefix_scores = q @ prefix.keys.transpose(-2, -1).to(q.dtype) * scale  # [B, H, N, P]; no scaled copy of q
    else:
        prefix_scores = prefix.logits.unsqueeze(2).expand(-1, -1, q.shape[2], -1)
    if gate is not None:
        prefix_scores = gate(prefix_scores)
    if _IMPL == "eager":
        return _eager_prefix_attention(q, k, v, prefix_scores, prefix.values, dropout_p)
    if _IMPL == "merged" or (_IMPL == "auto" and q.device.type == "cpu"):
        kernel = _flash_kernel(q, k, v, dropout_p)
        if kernel is not None:
            return _MergedPrefixAttention.apply(q, k, v, prefix_scores, prefix.values, kernel)
    return _fused_prefix_attention(q, k, v, prefix_scores, prefix.values, dropout_p)


def _eager_prefix_attention(q, k, v, prefix_scores, prefix_values, dropout_p: float) -> torch.Tensor:
    """The reference path: the [N, P + N] logits and their softmax made explicitly."""
    token_scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # [B, H, N, N]
    attn = torch.cat([prefix_scores, token_scores], dim=-1).softmax(dim=-1)
    if dropout_p:
        attn = F.dropout(attn, p=dropout_p)
    return attn @ torch.cat([prefix_values, v], dim=2)


_MASKED_LOGIT = -1000.0  # exp(-1000 - m) is 0 in every float type for any real token score m


def _fused_prefix_attention(q, k, v, prefix_scores, prefix_values, dropout_p: float) -> torch.Tensor:
    """The same attention through one fused SDPA call, exactly.

    The prefix columns' logits ``z`` (gated, or token-shared) are arbitrary [N, P] numbers, which
    no kernel takes as such; they become dot products instead: each query gains P coordinates
    ``z * sqrt(d)``, each prefix key is the unit vector on its own coordinate (zero elsewhere),
    each token key is zero there. With the scale 1/sqrt(d) a prefix column scores ``z`` and a token
    column ``q . k / sqrt(d)``, as in the eager path. The extra width is rounded up to a multiple
    of 8 and the values zero-padded to it, as fused kernels need equal, aligned head sizes; only
    the small [N, P] logits are ever materialised. A masked column (``-inf``, or a logit so
    negative that ``z * sqrt(d)`` overflows) would score ``-inf * 0 = nan`` on every token key, so
    logits are floored at -1000 first: ``exp`` is exactly 0 there as below it, and so is the
    gradient.
    """
    B, H, N, d = q.shape
    P = prefix_scores.shape[-1]
    prefix_scores = prefix_scores.clamp(min=_MASKED_LOGIT)
    width = -(-P // 8) * 8
    zeros = q.new_zeros
    unit_keys = torch.eye(P, width, dtype=q.dtype, device=q.device).expand(B, H, P, width)
    queries = torch.cat([q, prefix_scores.to(q.dtype) * d ** 0.5, zeros(B, H, N, width - P)], dim=-1)
    keys = torch.cat([torch.cat([zeros(B, H, P, d), unit_keys], dim=-1),
                      torch.cat([k, zeros(B, H, k.shape[2], width)], dim=-1)], dim=2)
    values = torch.cat([torch.cat([prefix_values.to(v.dtype), v], dim=2), zeros(B, H, P + v.shape[2], width)], dim=-1)
    out = F.scaled_dot_product_attention(queries, keys, values, dropout_p=dropout_p, scale=d ** -0.5)
    return out[..., :d]


class _FlashKernel:
    """One device's flash-attention kernel, called directly: unlike ``scaled_dot_product_attention``
    it returns each query's log-sum-exp, and its backward takes the output and log-sum-exp it is
    given (which lets the token part back-propagate the merged softmax)."""

    def __init__(self, device_type: str) -> None:
        self.device_type = device_type

    def forward(self, q, k, v, scale: float):
        """(output, fp32 log-sum-exp ``[B, H, N]``, what the backward needs besides them)."""
        if self.device_type == "cpu":
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
            return out, lse, ()
        out, lse, cum_q, cum_k, max_q, max_k, rng_state, unused, _ = \
            torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
        return out, lse, (cum_q, cum_k, max_q, max_k, rng_state, unused)

    def backward(self, grad_out, q, k, v, out, lse, state, scale: float):
        if self.device_type == "cpu":
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad_out, q, k, v, out, lse, 0.0, False, scale=scale)
        cum_q, cum_k, max_q, max_k, rng_state, unused = state
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            grad_out, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, False, rng_state, unused, scale=scale)


def merged_has_kernel(device: torch.device, dtype: torch.dtype, head_dim: int = 64) -> bool:
    """Whether the ``merged`` path has its flash kernel for heads of ``head_dim`` in ``dtype`` on
    ``device``; without one it runs ``fused`` (e.g. fp32 on CUDA)."""
    q = torch.zeros(1, 1, 1, head_dim, device=device, dtype=dtype)
    return _flash_kernel(q, q, q, 0.0) is not None


def _flash_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> Optional[_FlashKernel]:
    """The flash kernel for these queries, keys and values (one dtype and device, rows of
    contiguous head vectors), if there is one (no dropout: the merge would need its mask)."""
    if dropout_p:
        return None
    if any(t.dtype != q.dtype or t.device != q.device or t.stride(-1) != 1 for t in (k, v)) or q.stride(-1) != 1:
        return None
    if q.device.type == "cpu":
        return _FlashKernel("cpu") if q.dtype in (torch.float32, torch.bfloat16, torch.float16) else None
    # CUDA's FlashAttention-2 (not ROCm's): half precision, head sizes the backward takes on every sm80+ GPU
    if (q.device.type == "cuda" and torch.version.hip is None and q.dtype in (torch.bfloat16, torch.float16)
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128 and torch.backends.cuda.flash_sdp_enabled()
            and torch.backends.cuda.is_flash_attention_available()
            and torch.cuda.get_device_capability(q.device) >= (8, 0)):
        return _FlashKernel("cuda")
    return None


class _MergedPrefixAttention(torch.autograd.Function):
    """The one softmax over [prefix; tokens], exactly, without widening the heads.

    The token columns go through the flash kernel, which gives their output ``O_t`` and log-sum-exp
    ``l_t``; the small prefix columns (logits ``z``, values ``V_p``) are explicit. With the joint
    log-sum-exp ``l = logaddexp(l_t, logsumexp(z))`` the output is ``exp(l_t - l) O_t + exp(z - l) V_p``.
    Backward: the attention gradient of a token column depends on the softmax only through its
    probability ``exp(s - l)`` and the row term ``dO . out``, so the kernel's own backward, handed
    the merged output and ``l``, gives the exact query/key/value gradients; the prefix columns'
    gradients are explicit. The merge runs in fp32 (autocast off), returned in the queries' dtype.
    """

    @staticmethod
    def forward(ctx, q, k, v, prefix_scores, prefix_values, kernel: _FlashKernel):
        scale = q.shape[-1] ** -0.5
        with torch.autocast(q.device.type, enabled=False):
            token_out, token_lse, state = kernel.forward(q, k, v, scale)
            scores = prefix_scores.float()
            lse = torch.logaddexp(token_lse, scores.logsumexp(-1))
            prefix_probs = (scores - lse[..., None]).exp()
            # one fused pass over the [B, H, N, d] output, the half-precision O_t read as it is
            out = torch.addcmul(prefix_probs @ prefix_values.float(), token_out, (token_lse - lse).exp()[..., None],
                                out=torch.empty_like(token_out))
        ctx.save_for_backward(q, k, v, prefix_values, out, lse, prefix_probs)
        ctx.kernel, ctx.state, ctx.scale = kernel, state, scale
        ctx.dtypes = (prefix_scores.dtype, prefix_values.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, prefix_values, out, lse, prefix_probs = ctx.saved_tensors
        with torch.autocast(q.device.type, enabled=False):
            grad_out = grad_out.to(out.dtype)
            dq = dk = dv = None
            if any(ctx.needs_input_grad[:3]):  # e.g. not in the first prompted layer of a frozen backbone
                # the CUDA kernel reads the log-sum-exp as a dense [B, H, N] fp32 buffer
                dq, dk, dv = ctx.kernel.backward(grad_out, q, k, v, out, lse.contiguous(), ctx.state, ctx.scale)
            grad = grad_out.float()
            row = (grad * out.float()).sum(-1, keepdim=True)
            d_scores = prefix_probs * (grad @ prefix_values.float().transpose(-2, -1) - row)
            d_values = prefix_probs.transpose(-2, -1) @ grad
        return dq, dk, dv, d_scores.to(ctx.dtypes[0]), d_values.to(ctx.dtypes[1]), None


def _check_prefix(prefix: Prefix, q: torch.Tensor) -> None:
    B, H, _, D = q.shape
    if prefix.values.shape[0] != B or prefix.values.shape[1] != H or prefix.values.shape[3] != D:
        raise ValueError(
            f"prefix values {tuple(prefix.values.shape)} do not fit queries [B={B}, H={H}, *, {D}]"
        )


class PrefixAttention(Attention):
    """timm ``Attention`` that accepts a per-forward ``prompt`` for prefix tuning."""

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
        prompt: Optional[LayerPrompt] = None,
    ) -> torch.Tensor:
        if prompt is None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if attn_mask is not None or is_causal or self.gate is not None:
            raise NotImplementedError("prefix prompts do not support attention masks or gated attention")
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        dropout_p = self.attn_drop.p if self.training else 0.0
        x = prefix_attention(q, k, v, prompt(q), dropout_p=dropout_p)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        x = self.proj(x)
        return self.proj_drop(x)


class PromptBlock(Block):
    """timm ``Block`` whose attention takes a per-forward ``prompt``."""

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
        prompt: Optional[LayerPrompt] = None,
    ) -> torch.Tensor:
        attn_out = self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal, prompt=prompt)
        x = x + self.drop_path1(self.ls1(attn_out))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


def static_prompt(keys: torch.Tensor, values: torch.Tensor, gate: Optional[nn.Module] = None) -> LayerPrompt:
    """A prompt whose per-sample prefix does not depend on the queries (prefix tuning, HiDe, NoRGa)."""
    return lambda q: Prefix(values=values, keys=keys, gate=gate)
