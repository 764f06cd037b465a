"""Exactness of the one prefix-attention core."""

import pytest
import torch
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer

from promptcl.core.attention import Prefix, PrefixAttention, prefix_attention
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
