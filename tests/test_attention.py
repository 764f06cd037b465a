"""Exactness of the one prefix-attention core."""

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer

from promptcl.core.attention import Prefix, PrefixAttention, prefix_attention, prefix_attention_impl
from promptcl.core.backbone import build_backbone, encode
from promptcl.core.gates import LinearGate, NoRGaGate

B, H, N, D = 3, 4, 7, 16


def qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g) for _ in range(3)]


def naive(q, k, v, pk, pv, gate=lambda s: s):
    scale = D ** -0.5
    prefix_scores = gate((q @ pk.transpose(-2, -1)) * scale)
    token_scores = (q @ k.transpose(-2, -1)) * scale
    attn = torch.cat([prefix_scores, token_scores], -1).softmax(-1)
    return attn @ torch.cat([pv, v], 2)


def test_prefix_attention_layer_without_prompt_equals_timm_attention():
    torch.manual_seed(0)
    plain = Attention(64, num_heads=4, qkv_bias=True)
    ours = PrefixAttention(64, num_heads=4, qkv_bias=True)
    ours.load_state_dict(plain.state_dict())
    x = torch.randn(2, 9, 64)
    torch.testing.assert_close(ours(x), plain(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("gate", [None, LinearGate(), NoRGaGate("tanh")])
def test_empty_prefix_equals_plain_timm_vit(gate):
    """A model whose prompted layers get a zero-length prefix equals timm's own ViT (fp32, 1e-5)."""
    torch.manual_seed(0)
    ours = build_backbone("vit_digits", pretrained=False)
    plain = VisionTransformer(img_size=8, patch_size=2, in_chans=1, embed_dim=64, depth=4, num_heads=4,
                              mlp_ratio=2.0, num_classes=0)
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(5, 1, 8, 8)
    empty = torch.zeros(5, 4, 0, 16)
    prompts = {i: (lambda q: Prefix(values=empty, keys=empty, gate=gate)) for i in range(4)}
    expected = plain.forward_head(plain.forward_features(x), pre_logits=True)
    torch.testing.assert_close(encode(ours, x, prompts), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(encode(ours, x), expected, atol=1e-5, rtol=0)


def test_linear_gate_equals_naive_softmax_over_prefix_and_tokens():
    q, k, v = qkv()
    pk, pv = torch.randn(B, H, 5, D), torch.randn(B, H, 5, D)
    out = prefix_attention(q, k, v, Prefix(values=pv, keys=pk, gate=LinearGate()))
    torch.testing.assert_close(out, naive(q, k, v, pk, pv), atol=1e-5, rtol=0)


@pytest.mark.parametrize("activation,fn", [("tanh", torch.tanh), ("sigmoid", torch.sigmoid),
                                           ("gelu", torch.nn.functional.gelu)])
def test_norga_gate_equals_its_formula(activation, fn):
    gate = NoRGaGate(activation, alpha=0.7, tau=1.9)
    s = torch.linspace(-3, 3, 11)
    torch.testing.assert_close(gate(s), s + 0.7 * fn(1.9 * s))
    q, k, v = qkv(1)
    pk, pv = torch.randn(B, H, 5, D), torch.randn(B, H, 5, D)
    out = prefix_attention(q, k, v, Prefix(values=pv, keys=pk, gate=gate))
    expected = naive(q, k, v, pk, pv, gate=lambda u: u + 0.7 * fn(1.9 * u))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    # the gate changes the output: a linear-gate result would differ
    assert not torch.allclose(out, naive(q, k, v, pk, pv), atol=1e-3)


def test_norga_gate_rejects_unknown_activation():
    with pytest.raises(ValueError, match="unknown NoRGa activation"):
        NoRGaGate("relu6")


def test_token_shared_logits_enter_one_softmax():
    q, k, v = qkv(2)
    logits, pv = torch.randn(B, H, 3), torch.randn(B, H, 3, D)
    out = prefix_attention(q, k, v, Prefix(values=pv, logits=logits))
    token_scores = (q @ k.transpose(-2, -1)) * D ** -0.5
    attn = torch.cat([logits[:, :, None, :].expand(-1, -1, N, -1), token_scores], -1).softmax(-1)
    torch.testing.assert_close(out, attn @ torch.cat([pv, v], 2), atol=1e-5, rtol=0)


def test_prefix_shape_errors_are_clear():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="exactly one of keys or logits"):
        Prefix(values=torch.zeros(B, H, 2, D))
    with pytest.raises(ValueError, match="do not fit queries"):
        prefix_attention(q, k, v, Prefix(values=torch.zeros(B, H + 1, 2, D), keys=torch.zeros(B, H + 1, 2, D)))


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]  # on a GPU the fused path is SDPA's CUDA kernels


def _both_paths(prefix_of, dtype, seed=0, device="cpu", impl="fused"):
    """Output and gradients (queries, keys, values, prefix tensors, gate scalars) of the eager path
    and of ``impl`` on the same inputs."""
    g = torch.Generator().manual_seed(seed)
    results = {}
    for impl in ("eager", impl):
        g.manual_seed(seed)
        q, k, v = (torch.randn(B, H, 33, D, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
        prefix, leaves = prefix_of(g, dtype, device)
        with prefix_attention_impl(impl):
            out = prefix_attention(q, k, v, prefix)
        weights = torch.randn(out.shape, generator=g).to(device, dtype)
        grads = torch.autograd.grad((out * weights).sum(), [q, k, v, *leaves])
        results[impl] = (out, grads)
    return results["eager"], results[impl]


def _gated_keys(num_prompts, activation="tanh"):
    gate = NoRGaGate(activation, alpha=0.7, tau=1.9)

    def make(g, dtype, device):
        pk, pv = (torch.randn(B, H, num_prompts, D, generator=g).to(device, dtype).requires_grad_() for _ in range(2))
        gate.to(device, dtype)
        return Prefix(values=pv, keys=pk, gate=gate), [pk, pv, gate.alpha, gate.tau]
    return make


def _shared_logits(num_prompts, gated=False):
    gate = NoRGaGate("sigmoid", alpha=0.5, tau=1.2) if gated else None

    def make(g, dtype, device):
        logits = (3 * torch.randn(B, H, num_prompts, generator=g)).to(device, dtype).requires_grad_()
        pv = torch.randn(B, H, num_prompts, D, generator=g).to(device, dtype).requires_grad_()
        if gate is not None:
            gate.to(device, dtype)
        return Prefix(values=pv, logits=logits, gate=gate), [logits, pv] + ([gate.alpha, gate.tau] if gate else [])
    return make


def _masked_logits(fill):
    """Token-shared logits whose last columns are masked out, as a method that drops experts by
    masking (not gathering) would pass them."""

    def make(g, dtype, device):
        logits = (3 * torch.randn(B, H, 6, generator=g)).to(device, dtype)
        logits[..., 3:] = fill if fill is not None else torch.finfo(dtype).min
        pv = torch.randn(B, H, 6, D, generator=g).to(device, dtype).requires_grad_()
        return Prefix(values=pv, logits=logits.requires_grad_()), [logits, pv]
    return make


PREFIXES = {
    **{f"norga_{p}": _gated_keys(p) for p in (1, 5, 8, 13)},  # below, at and above one block of 8
    "norga_gelu": _gated_keys(5, "gelu"),
    **{f"smope_{p}": _shared_logits(p) for p in (2, 8, 24)},
    "shared_logits_gated": _shared_logits(4, gated=True),
    "masked_minus_inf": _masked_logits(float("-inf")),
    "masked_dtype_min": _masked_logits(None),
}


IMPLS = ["fused", "merged"]  # on CUDA in fp32, merged has no flash kernel and is the fused path


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(PREFIXES))
def test_fused_prefix_attention_equals_the_eager_path_forward_and_backward_in_fp32(name, device, impl):
    (eager, eager_grads), (fused, fused_grads) = _both_paths(PREFIXES[name], torch.float32, device=device, impl=impl)
    torch.testing.assert_close(fused, eager, atol=1e-5, rtol=0)
    for a, b in zip(fused_grads, eager_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["norga_5", "smope_8", "norga_13"])
def test_fused_prefix_attention_equals_the_eager_path_in_bf16(name, device, impl):
    (eager, eager_grads), (fused, fused_grads) = _both_paths(PREFIXES[name], torch.bfloat16, device=device, impl=impl)
    reference, reference_grads = _both_paths(PREFIXES[name], torch.float32, device=device)[0]
    # bf16 tolerance: the fused path is about as far from the fp32 result as the eager path is.
    # Not compared: the gate scalars' gradients, sums of B*H*N*P bf16 products that mostly cancel,
    # whose error is the accumulation's in either path (training keeps them in fp32 under autocast).
    pairs = list(zip(fused_grads, eager_grads, reference_grads))[:5]  # q, k, v and the two prefix tensors
    for ours, theirs, exact in [(fused, eager, reference), *pairs]:
        scale = exact.abs().max().clamp_min(1.0)
        fused_error = ((ours.float() - exact).abs().max() / scale).item()
        eager_error = ((theirs.float() - exact).abs().max() / scale).item()
        assert fused_error <= 2 * eager_error + 1e-2, (fused_error, eager_error)


@pytest.mark.parametrize("impl", ["sdpa", "fused"])
def test_fp32_prompts_join_bf16_tokens_in_bf16_under_autocast(impl):
    """bf16 autocast: the fp32 prompt parameters are cast before they join the tokens, so no
    [B, H, P + N, d] tensor is made in fp32 (SDPA would cast it back); the numbers are the same."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CatDtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten.cat.default:
                self.dtypes.append(out.dtype)
            return out

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, 33, D, generator=g).bfloat16() for _ in range(3))
    keys, values = (torch.randn(B, H, 5, D, generator=g).requires_grad_() for _ in range(2))  # fp32, as trained
    gate = None if impl == "sdpa" else NoRGaGate("tanh", alpha=0.7, tau=1.9)
    with torch.autocast("cpu", dtype=torch.bfloat16), prefix_attention_impl("fused"), CatDtypes() as cats:
        out = prefix_attention(q, k, v, Prefix(values=values, keys=keys, gate=gate))
    assert out.dtype == torch.bfloat16 and cats.dtypes and set(cats.dtypes) == {torch.bfloat16}
    if impl == "sdpa":  # what SDPA's autocast made of the fp32 concatenation before
        with torch.autocast("cpu", dtype=torch.bfloat16):
            promoted = F.scaled_dot_product_attention(q, torch.cat([keys, k], 2), torch.cat([values, v], 2))
        assert torch.equal(out, promoted)
    (out.float().sum()).backward()
    assert keys.grad.dtype == values.grad.dtype == torch.float32 and values.grad.abs().sum() > 0


def test_auto_is_the_merged_path_on_the_cpu_and_an_unknown_choice_is_refused():
    from promptcl.core import attention

    assert attention._IMPL == "auto"
    with prefix_attention_impl("eager"):
        assert attention._IMPL == "eager"
    assert attention._IMPL == "auto"
    with pytest.raises(ValueError, match="unknown prefix attention implementation 'flash'"):
        with prefix_attention_impl("flash"):
            pass
    q, k, v = qkv()
    q.requires_grad_()
    prefix = Prefix(values=torch.randn(B, H, 3, D), logits=torch.randn(B, H, 3))

    def node(impl="auto", dtype=torch.float32, dropout_p=0.0):
        with prefix_attention_impl(impl):
            out = prefix_attention(q.to(dtype), k.to(dtype), v.to(dtype), prefix, dropout_p=dropout_p)
        return type(out.grad_fn).__name__

    assert node() == node("merged") == "_MergedPrefixAttentionBackward"
    assert node("fused") != node()
    # no flash kernel for float64, nor a merge with dropout: the fused path
    assert node(dtype=torch.float64) == node("merged", dtype=torch.float64) == node("fused", dtype=torch.float64)
    assert node(dropout_p=0.1) != "_MergedPrefixAttentionBackward"
    # what the benchmark asks to mark a merged row that ran fused
    assert attention.merged_has_kernel(torch.device("cpu"), torch.float32)
    assert not attention.merged_has_kernel(torch.device("cpu"), torch.float64)
    strided = v.transpose(-2, -1).contiguous().transpose(-2, -1)  # head vectors not contiguous: no kernel
    with prefix_attention_impl("merged"):
        out = prefix_attention(q, k, strided, prefix)
    with prefix_attention_impl("eager"):
        torch.testing.assert_close(out, prefix_attention(q, k, v, prefix), atol=1e-5, rtol=0)
    assert type(out.grad_fn).__name__ != "_MergedPrefixAttentionBackward"


def test_merged_path_without_token_gradients_still_trains_the_prefix(monkeypatch):
    """In the first prompted layer of a frozen backbone only the prefix needs gradients: the kernel's
    backward is skipped and the prefix gradients are the eager path's."""
    from promptcl.core import attention

    def no_kernel_backward(*args, **kwargs):
        raise AssertionError("the kernel's backward ran, though no token input needs a gradient")

    monkeypatch.setattr(attention._FlashKernel, "backward", no_kernel_backward)
    q, k, v = qkv()
    grads = {}
    for impl in ("eager", "merged"):
        logits = torch.randn(B, H, 3, generator=torch.Generator().manual_seed(1)).requires_grad_()
        values = torch.randn(B, H, 3, D, generator=torch.Generator().manual_seed(2)).requires_grad_()
        with prefix_attention_impl(impl):
            out = prefix_attention(q, k, v, Prefix(values=values, logits=logits))
        if impl == "merged":
            assert type(out.grad_fn).__name__ == "_MergedPrefixAttentionBackward"
        grads[impl] = torch.autograd.grad(out.square().sum(), [logits, values])
    for merged, eager in zip(grads["merged"], grads["eager"]):
        torch.testing.assert_close(merged, eager, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["norga", "smope"])
def test_a_prompted_model_is_the_same_through_either_path(method, device):
    """Whole prompted forward and its prompt gradients on the digits backbone, eager vs fused."""
    from promptcl.methods import get_method

    cls = get_method(method)
    torch.manual_seed(0)
    model = cls(cls.PRESETS["small"], backbone=build_backbone("vit_digits", pretrained=False), num_classes=10,
                num_tasks=5).to(device)
    x = torch.randn(6, 1, 8, 8).to(device)
    forward = {"norga": lambda: model.features(x, torch.tensor([0, 1, 2, 3, 4, 0], device=device)),
               "smope": lambda: model.features(x, mode="sparse")}[method]
    results = {}
    for impl in ("eager", "fused", "merged"):
        model.zero_grad()
        with prefix_attention_impl(impl):
            out = forward()
        out.square().sum().backward()
        results[impl] = (out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    eager, eager_grads = results["eager"]
    for fused, fused_grads in (results["fused"], results["merged"]):
        torch.testing.assert_close(fused, eager, atol=1e-5, rtol=0)
        assert eager_grads.keys() == fused_grads.keys() and eager_grads
        for name in eager_grads:
            torch.testing.assert_close(fused_grads[name], eager_grads[name], atol=1e-5, rtol=1e-4)
