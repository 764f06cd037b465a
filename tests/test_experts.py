"""SMoPE's sparse prompt experts: routing, noise, losses, bookkeeping."""

import math

import pytest
import torch

from promptcl.core.attention import prefix_attention
from promptcl.core.backbone import build_backbone, encode
from promptcl.core.experts import Routing, SparsePromptExperts


def experts(**kw):
    torch.manual_seed(0)
    args = dict(layers=(0, 1), num_heads=4, head_dim=16, num_experts=6, top_k=2, noise_scale=0.5)
    return SparsePromptExperts(**{**args, **kw})


def test_top_k_equal_to_expert_count_equals_dense_mode():
    vit = build_backbone("vit_digits", pretrained=False)
    e = experts(top_k=6)
    x = torch.randn(4, 1, 8, 8)
    sparse = encode(vit, x, e.prompts("sparse", noisy=False, routing=Routing()))
    dense = encode(vit, x, e.prompts("dense", noisy=False, routing=Routing()))
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=0)


def test_sparse_layer_matches_hand_built_reference():
    e = experts()
    q, k, v = (torch.randn(3, 4, 5, 16) for _ in range(3))
    routing = Routing()
    out = prefix_attention(q, k, v, e.prompts("sparse", noisy=False, routing=routing)[0](q))
    for b in range(3):
        for h in range(4):
            qbar = q[b, h].mean(0)
            scores = e.keys[0, h] @ qbar  # raw proxy scores
            sel = scores.topk(2).indices
            logits = scores[sel] / 4.0  # 1/sqrt(head_dim)
            tok = q[b, h] @ k[b, h].T / 4.0
            attn = torch.cat([logits.expand(5, -1), tok], -1).softmax(-1)
            ref = attn @ torch.cat([e.values[0, h, sel], v[b, h]])
            torch.testing.assert_close(out[b, h], ref, atol=1e-5, rtol=0)
            torch.testing.assert_close(routing.scores[0][b, h], scores)


def test_outputs_do_not_depend_on_the_batch():
    vit = build_backbone("vit_digits", pretrained=False)
    e = experts()
    e.frequent[0, :, :2] = True  # noisy routing too must stay per sample
    x = torch.randn(16, 1, 8, 8)
    for noisy in (False, True):
        batch = encode(vit, x, e.prompts("sparse", noisy=noisy, routing=Routing()))
        single = torch.cat([encode(vit, x[i:i + 1], e.prompts("sparse", noisy=noisy, routing=Routing()))
                            for i in range(16)])
        torch.testing.assert_close(batch, single, atol=1e-5, rtol=0)


def test_noise_pushes_frequent_experts_out_by_a_range_relative_margin():
    e = experts(noise_scale=0.5)
    scores = torch.tensor([[[4.0, 3.9, 3.0, 0.0, 1.0, 2.0]]])  # range 4
    frequent = torch.tensor([[True, False, False, False, False, False]])
    assert e.select(scores, None)[0, 0].tolist() == [0, 1]
    # expert 0 drops to 4 - 0.5*4 = 2.0 < 3.0: experts 1 and 2 win
    assert sorted(e.select(scores, frequent)[0, 0].tolist()) == [1, 2]
    assert sorted(e.select(scores, frequent.clone().fill_(False))[0, 0].tolist()) == [0, 1]


def test_router_loss_matches_hand_computation():
    e = experts(noise_scale=0.5)
    s = torch.tensor([[[2.0, 1.0, 0.0, -1.0, 0.5, 1.5]]])  # one sample, one head
    routing = Routing(scores=[s], selected=[torch.tensor([[[0, 5]]])])
    # non-selected get + 0.5 * range(3.0) = +1.5
    denom = math.log(sum(math.exp(v) for v in [2.0, 1.5, 2.5, 1.5, 0.5, 2.0]))
    expected = -((2.0 - denom) + (1.5 - denom))
    assert e.router_loss(routing).item() == pytest.approx(expected, rel=1e-6)


def test_prototype_loss_uses_only_flagged_old_keys():
    e = experts()
    with torch.no_grad():
        e.old_keys.copy_(e.keys)
    assert e.prototype_loss().item() == 0.0  # nothing flagged
    e.frequent[1, 2, 3] = True
    old = e.old_keys[1, 2]
    target = (old @ old[3]).topk(2).indices
    logp = (e.keys[1, 2] @ old[3]).log_softmax(-1)
    assert e.prototype_loss().item() == pytest.approx(-logp[target].sum().item(), rel=1e-6)


def test_usage_counts_and_sticky_flags():
    e = experts(top_k=1, layers=(0,), num_heads=1, num_experts=4)
    routing = Routing(selected=[torch.tensor([[[0]], [[0]], [[0]], [[1]]])])
    e.count_usage(routing)
    assert e.usage[0, 0].tolist() == [3.0, 1.0, 0.0, 0.0]
    e.begin_task("used")  # mean over used experts = 2 -> only expert 0
    assert e.frequent[0, 0].tolist() == [True, False, False, False]
    e.usage.zero_()
    e.usage[0, 0, 2] = 5.0
    e.begin_task("used")  # flags are sticky
    assert e.frequent[0, 0].tolist() == [True, False, True, False]
    f = experts(top_k=1, layers=(0,), num_heads=1, num_experts=4)
    f.usage[0, 0] = torch.tensor([3.0, 1.0, 0.0, 0.0])
    f.begin_task("all")  # poster rule: mean over all experts = 1 -> experts 0 and 1
    assert f.frequent[0, 0].tolist() == [True, True, False, False]


def test_state_survives_a_state_dict_round_trip():
    e = experts()
    e.usage += 3
    e.frequent[0, 0, 0] = True
    e.begin_task("used")
    f = experts()
    f.load_state_dict(e.state_dict())
    for name in ("usage", "frequent", "old_keys", "keys", "values"):
        assert torch.equal(getattr(f, name), getattr(e, name))


def test_top_k_larger_than_expert_count_is_rejected():
    with pytest.raises(ValueError, match="top_k=7"):
        experts(top_k=7)
