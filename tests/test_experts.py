"""SMoPE's sparse prompt experts: routing, noise, losses, bookkeeping."""

import math

import pytest
import torch

from promptcl.config import apply_overrides
from promptcl.core.attention import prefix_attention
from promptcl.core.backbone import build_backbone, encode
from promptcl.core.experts import Routing, SparsePromptExperts
from promptcl.methods import get_method
from promptcl.methods.base import TaskInfo


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
    # counts are the clean top-1 of the raw scores, whatever the routing selected
    scores = torch.tensor([[[5.0, 1, 0, 0]], [[4, 1, 0, 0]], [[3, 1, 0, 0]], [[0, 2, 1, 0]]])
    routing = Routing(scores=[scores], selected=[torch.tensor([[[3]], [[3]], [[3]], [[3]]])])
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
    with torch.no_grad():  # trained parameters: a fresh copy built the same way differs
        e.keys.add_(1.0)
        e.values.mul_(-2.0)
    e.begin_task("used")
    f = experts()
    assert not torch.equal(f.keys, e.keys) and not torch.equal(f.usage, e.usage)
    f.load_state_dict(e.state_dict())
    for name in ("usage", "frequent", "old_keys", "keys", "values"):
        assert torch.equal(getattr(f, name), getattr(e, name))


def test_top_k_larger_than_expert_count_is_rejected():
    with pytest.raises(ValueError, match="top_k=7"):
        experts(top_k=7)


def test_compat_switch_excludes_never_used_experts_from_clean_routing_only():
    """The reference's evaluation quirk: with usage counts, experts never used so far drop out of
    the clean top-k (offset of twice the score range); noisy (training) routing ignores it, and
    with no counts yet every expert is shifted alike, so nothing changes."""
    plain, compat = experts(), experts(exclude_unused_when_clean=True)
    q = torch.randn(8, 4, 5, 16)

    def clean_selection(e, noisy=False):
        routing = Routing()
        e.prompts("sparse", noisy=noisy, routing=routing)[0](q)
        return routing.selected[0]

    assert torch.equal(clean_selection(plain), clean_selection(compat))  # no usage yet
    used = clean_selection(plain)[0, 0]  # sample 0, head 0: the two it picks
    for e in (plain, compat):
        e.usage[0, 0, used] = 1.0  # only those two of head 0 have ever been used
    picked = clean_selection(compat)
    assert torch.equal(picked[:, 0].sort(-1).values, used.sort().values.expand(8, -1))
    assert not torch.equal(picked, clean_selection(plain))  # other samples would have picked others
    assert torch.equal(clean_selection(compat, noisy=True), clean_selection(plain, noisy=True))


def test_smope_presets_follow_the_reference_scripts_per_benchmark_and_task_count():
    from promptcl.methods import get_method

    smope = get_method("smope")
    by_tasks = {t: smope.preset_for("imagenet_r", "sup1k", None, t) for t in (5, 10, 20)}
    assert {t: (c.noise_scale, c.router_weight, c.proto_weight, c.lr_hold_iters, c.ca_epochs,
                c.ca_samples_per_class) for t, c in by_tasks.items()} == {
        5: (0.7, 1e-4, 1e-5, 80, 60, 128), 10: (0.5, 5e-5, 1e-4, 40, 50, 384), 20: (0.3, 1e-4, 5e-5, 20, 50, 256)}
    assert all((c.batch_size, c.lr) == (64, 0.0025) for c in by_tasks.values())
    cub = smope.preset_for("cub200", "sup21k_augreg", None, 10)
    assert (cub.schedule, cub.proto_weight, cub.batch_size, cub.lr) == ("epoch-cosine", 5e-5, 128, 0.005)
    assert smope.preset_for("cifar100", "sup1k", None, 10) == smope.PRESETS["paper"]
    assert smope.preset_for("cifar100", "sup1k", "imagenet-r", 5) == smope.PRESETS["imagenet-r"]  # explicit wins


def test_cub_schedule_is_codas_per_epoch_cosine():
    from promptcl.methods.smope import CUB200

    groups, schedules = CUB200.param_groups([torch.nn.Parameter(torch.zeros(1))], torch.nn.Linear(1, 1), epochs=20)
    factors = [schedules[0](it, 200) for it in range(0, 200, 10)]  # 10 iterations per epoch
    assert factors[0] == 1.0 and all(a >= b for a, b in zip(factors, factors[1:]))
    assert factors[-1] == pytest.approx(math.cos(99 * math.pi / 200))  # ends near 0.016, no hold


def test_router_loss_is_a_mean_over_the_batch():
    """Two copies of one sample must cost what one costs: the loss is a batch mean (so its weight
    does not scale with the batch size), summed over heads and the k selected."""
    e = experts(noise_scale=0.5)
    s = torch.tensor([[[2.0, 1.0, 0.0, -1.0, 0.5, 1.5]]])
    one = Routing(scores=[s], selected=[torch.tensor([[[0, 5]]])])
    two = Routing(scores=[s.expand(2, -1, -1)], selected=[torch.tensor([[[0, 5]], [[0, 5]]])])
    denom = math.log(sum(math.exp(v) for v in [2.0, 1.5, 2.5, 1.5, 0.5, 2.0]))  # as in the test above
    expected = -((2.0 - denom) + (1.5 - denom))
    assert e.router_loss(one).item() == pytest.approx(expected, rel=1e-6)
    assert e.router_loss(two).item() == pytest.approx(expected, rel=1e-6)


def test_prototype_loss_targets_old_routing_and_trains_current_keys():
    """Targets are the experts the old keys routed an old prototype to (old . old); the log-probs
    come from the current keys (current . old), which are what the loss must move. The keys drift
    from the snapshot, and two of them swap places, so the two top-k differ and mixing them up shows."""
    e = experts()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        e.old_keys.copy_(torch.randn(e.keys.shape, generator=g))
        e.keys.copy_(e.old_keys + 0.3 * torch.randn(e.keys.shape, generator=g))
    old = e.old_keys[1, 2]
    target = (old @ old[3]).topk(2).indices
    runner_up, last = [j for j in target.tolist() if j != 3][0], (old @ old[3]).argmin().item()
    with torch.no_grad():
        e.keys[1, 2, [runner_up, last]] = e.keys[1, 2, [last, runner_up]].clone()
    e.frequent[1, 2, 3] = True
    keys = e.keys[1, 2].detach()
    assert set(target.tolist()) != set((keys @ old[3]).topk(2).indices.tolist())  # the drift matters
    logp = (keys @ old[3]).log_softmax(-1)
    assert e.prototype_loss().item() == pytest.approx(-logp[target].sum().item(), rel=1e-6)
    # d/dkeys[e] = (k * softmax_e - [e in target]) * old[3], only in the flagged (layer, head)
    (grad,) = torch.autograd.grad(e.prototype_loss(), e.keys)
    coeff = 2 * logp.exp()
    coeff[target] -= 1.0
    expected = torch.zeros_like(grad)
    expected[1, 2] = coeff[:, None] * old[3]
    torch.testing.assert_close(grad, expected, atol=1e-5, rtol=0)


def test_prototype_loss_averages_the_flagged_experts_of_a_head():
    """Per (layer, head) the loss is the mean over its flagged prototypes, summed over (layer, head)."""
    e = experts()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        e.old_keys.copy_(torch.randn(e.keys.shape, generator=g))
        e.keys.copy_(e.old_keys + 0.3 * torch.randn(e.keys.shape, generator=g))

    def term(layer, head, p):
        old = e.old_keys[layer, head]
        target = (old @ old[p]).topk(2).indices
        return -(e.keys[layer, head].detach() @ old[p]).log_softmax(-1)[target].sum().item()

    e.frequent[1, 2, 3] = e.frequent[1, 2, 5] = e.frequent[0, 1, 0] = True
    expected = (term(1, 2, 3) + term(1, 2, 5)) / 2 + term(0, 1, 0)
    assert e.prototype_loss().item() == pytest.approx(expected, rel=1e-6)


def test_clean_routing_ignores_the_frequent_flags():
    """The adaptive noise is a training-time device: clean (evaluation) routing is the plain top-k
    of the scores even when the experts it picks are flagged, while noisy routing avoids them."""
    e = experts(noise_scale=1.0)  # a flagged expert drops to at most the sample's minimum score
    q = torch.randn(4, 4, 5, 16)

    def routed(noisy):
        routing = Routing()
        e.prompts("sparse", noisy=noisy, routing=routing)[0](q)
        return routing.scores[0], routing.selected[0]

    scores, before = routed(False)
    flagged = before[0]  # [H, K]: what sample 0 picks per head
    e.frequent[0].scatter_(-1, flagged, True)
    scores, clean = routed(False)
    assert torch.equal(clean, scores.topk(2, dim=-1).indices)
    assert torch.equal(clean, before)
    _, noisy = routed(True)
    for h in range(4):  # noisy routing of sample 0 avoids every flagged expert of its head
        assert not set(noisy[0, h].tolist()) & set(flagged[h].tolist())


def test_usage_is_counted_per_head():
    """Each head's counts are its own samples' top-k; two heads picking different experts must not
    mix (the scatter goes over [head, sample * k])."""
    e = experts(top_k=1, layers=(0,), num_heads=2, num_experts=4)
    # samples' top-1 -- head 0: 0, 0, 1; head 1: 3, 2, 3
    scores = torch.tensor([[[5.0, 1, 0, 0], [0, 0, 1, 4]],
                           [[4.0, 1, 0, 0], [0, 1, 3, 2]],
                           [[0.0, 2, 1, 0], [1, 0, 0, 2]]])
    e.count_usage(Routing(scores=[scores], selected=[scores.topk(1, dim=-1).indices]))
    assert e.usage[0, 0].tolist() == [2.0, 1.0, 0.0, 0.0]
    assert e.usage[0, 1].tolist() == [0.0, 0.0, 1.0, 2.0]


def smope(**overrides):
    torch.manual_seed(0)
    cls = get_method("smope")
    config = apply_overrides(cls.PRESETS["small"], overrides)
    return cls(config, backbone=build_backbone("vit_digits", pretrained=False), num_classes=10, num_tasks=5)


def test_sparse_training_routes_with_the_adaptive_noise(monkeypatch):
    """The sparse phase's forward hands every prompted layer its frequent-expert flags (noisy
    routing); the dense warm-up routes no top-k at all."""
    m = smope()
    for layer in range(m.experts.frequent.shape[0]):  # other flags in each layer: each must get its own
        m.experts.frequent[layer, :, layer % m.experts.frequent.shape[2]] = True
    assert not torch.equal(m.experts.frequent[0], m.experts.frequent[1])
    task = TaskInfo(0, range(0, 2), 5)
    warmup, sparse = m.phases(task)
    received = []
    real_select = m.experts.select

    def recording_select(scores, frequent, unused=None):
        received.append(frequent)
        return real_select(scores, frequent, unused)

    monkeypatch.setattr(m.experts, "select", recording_select)
    images, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 0, 1])
    m.training_loss(images, labels, task, warmup)
    assert received == []
    m.training_loss(images, labels, task, sparse)
    assert len(received) == 3  # small preset: prompt layers (0, 1, 2)
    for i, frequent in enumerate(received):
        assert frequent is not None and torch.equal(frequent, m.experts.frequent[i])


def test_dense_warmup_only_on_the_first_task():
    """The dense all-experts warm-up (half the epochs in the small preset) precedes the first
    task's sparse training only; later tasks train sparse from the start."""
    from promptcl.methods.base import TaskInfo

    m = smope()
    first = m.phases(TaskInfo(0, range(0, 2), 5))
    assert [(p.name, p.epochs) for p in first] == [("dense_warmup", 3), ("sparse", 6)]
    for t in (1, 4):
        assert [(p.name, p.epochs) for p in m.phases(TaskInfo(t, range(2 * t, 2 * t + 2), 5))] == [("sparse", 6)]
