"""The comparison methods (L2P, DualPrompt, S-Prompt, CODA-Prompt, OVOR, VQ-Prompt) and the
baselines (SimpleCIL, finetune, joint): each one's defining mechanism, per-sample predictions,
the papers' parameter counts, and a run of every method through the engine."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from promptcl.cli import main
from promptcl.config import apply_overrides
from promptcl.core.backbone import build_backbone, encode, encode_tokens
from promptcl.core.experts import Routing
from promptcl.core.feature_store import FeatureStore
from promptcl.core.prompts import batch_majority, prefix_prompt, pull_constraint, top_keys
from promptcl.data.benchmarks import ClassIncremental, load_dataset
from promptcl.engine import RunSpec, resolve_run, run_sequence, train_phase
from promptcl.methods import get_method, method_names
from promptcl.methods.base import Phase, TaskInfo, hold_then_cosine
from promptcl.methods.coda import gram_schmidt_rows, orthogonality_penalty
from promptcl.methods.ovor import kth_neighbour_distance, virtual_outliers
from promptcl.methods.sprompt import kmeans_centroids

T = 5
NEW_METHODS = ("l2p", "dualprompt", "sprompt++", "sprompt", "coda", "ovor", "vqprompt", "simplecil", "finetune",
               "joint")


def make(name, backbone=None, **overrides):
    torch.manual_seed(0)
    cls = get_method(name)
    config = apply_overrides(cls.PRESETS["small"], overrides)
    vit = backbone or build_backbone("vit_digits", pretrained=True)
    return cls(config, backbone=vit, num_classes=10, num_tasks=T).eval()


def begin(method, tasks=T):
    for t in range(tasks):
        method.begin_task(TaskInfo(t, range(2 * t, 2 * t + 2), T))
    return method


def scramble(method):
    """Random values in every trainable tensor and float statistic, so that a wrong gather or a
    batch-dependent step shows in the predictions."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in [*method.named_parameters(), *method.named_buffers()]:
            if not name.startswith("backbone.") and t.is_floating_point():
                t.copy_(0.5 * torch.randn(t.shape, generator=g))
    return method


def digit_images(n):
    """``n`` real test digits, classes mixed."""
    test = load_dataset("digits").test
    return torch.stack([test[i][0] for i in range(0, 7 * n, 7)])


MASKED_TRAINING = ("l2p", "dualprompt", "sprompt++", "coda", "ovor", "vqprompt", "hide", "norga", "smope")


@pytest.mark.parametrize("name", [*MASKED_TRAINING, "finetune", "joint"])
def test_training_masks_the_logits_of_earlier_tasks_classes(name):
    """The class-incremental protocol of the prompt methods: a task's cross-entropy is over its own
    classes, so the head rows of earlier classes get no gradient (unmasked, the softmax would push
    them down: more forgetting). finetune and joint compete over every seen class."""
    m = begin(make(name), tasks=2)
    task = TaskInfo(1, range(2, 4), T)
    with torch.no_grad():
        m.head.bias[:2] = 5.0  # earlier classes that would win an unmasked softmax
    loss, _ = m.training_loss(digit_images(6), torch.tensor([2, 3, 2, 3, 2, 3]), task, m.phases(task)[0])
    loss.backward()
    assert m.head.weight.grad[2:4].abs().sum() > 0
    masked = m.head.weight.grad[:2].abs().sum() == 0 and m.head.bias.grad[:2].abs().sum() == 0
    assert masked == (name in MASKED_TRAINING)


def test_every_method_is_registered():
    assert set(NEW_METHODS) | {"smope", "hide", "norga"} == set(method_names())


@pytest.mark.parametrize("name, options", [*((name, {}) for name in NEW_METHODS),
                                           ("sprompt", {"centroid_distance": "l2"})])
def test_predictions_do_not_depend_on_the_rest_of_the_batch(name, options):
    m = scramble(begin(make(name, **options)))
    x = digit_images(30)  # past 25 rows, where cdist's default would change its formula
    batch = m.predict(x)
    assert len(set(batch.tolist())) > 1
    assert torch.equal(batch, torch.cat([m.predict(x[i:i + 1]) for i in range(len(x))]))


@pytest.mark.parametrize("name", ["l2p", "dualprompt"])
def test_the_reference_batchwise_vote_makes_predictions_depend_on_the_batch(name):
    m = scramble(begin(make(name, batchwise_prompt=True)))
    x = digit_images(32)
    assert not torch.equal(m.predict(x), torch.cat([m.predict(x[i:i + 1]) for i in range(len(x))]))


def test_batch_majority_by_hand():
    picked = torch.tensor([[0, 1], [1, 2], [1, 0], [3, 2]])  # counts 0:2, 1:3, 2:2, 3:1
    assert batch_majority(picked, 4).tolist() == [[1, 0]] * 4  # ties go to the lower index


# --- L2P ------------------------------------------------------------------------------------
def test_l2p_picks_the_top_n_keys_by_cosine_similarity_to_the_frozen_query():
    m = make("l2p", top_k=3)
    x = torch.randn(6, 1, 8, 8)
    query = encode(m.backbone, x)
    for b in range(len(x)):
        cos = [float(query[b] @ k / (query[b].norm() * k.norm())) for k in m.keys.detach()]
        similarity, picked = m.select(x[b:b + 1])  # one key set: [1, B, ...]
        assert picked[0, 0].tolist() == list(np.argsort(cos)[::-1][:3])
        torch.testing.assert_close(similarity[0, 0], torch.tensor(cos), atol=1e-6, rtol=0)


def test_l2p_pull_constraint_trains_only_the_picked_keys():
    m = make("l2p", top_k=2)
    x = torch.randn(4, 1, 8, 8)
    (similarity,), (picked,) = m.select(x)
    pull_constraint(similarity, picked).backward()
    touched = (m.keys.grad.abs().sum(1) > 0).nonzero().flatten().tolist()
    assert touched == sorted(set(picked.flatten().tolist()))
    # by hand: minus the summed similarity of the picked keys, averaged over the batch
    expected = -sum(float(similarity[b, k].detach()) for b in range(4) for k in picked[b]) / 4
    assert pull_constraint(similarity, picked).item() == pytest.approx(expected, abs=1e-6)


def test_l2p_compat_batch_crossed_pull_is_codas_indexing():
    """CODA's ``(1 - cos_sim[:, k_idx]).sum()``: each of the B queries against every pick of every
    sample (B x B x k terms), per key set; the default pulls each sample's own picks only."""
    m = make("l2p", form="prefix", prefix_layers=(0, 2), top_k=2, layer_keys=True, compat_batch_crossed_pull=True)
    x = torch.randn(3, 1, 8, 8)
    task = TaskInfo(0, range(0, 2), T)
    m.begin_task(task)
    similarity, picked = m.select(x)
    _, logs = m.training_loss(x, torch.tensor([0, 1, 0]), task, m.phases(task)[0])
    expected = sum(1 - float(similarity[i, b, picked[i, c, j]].detach())
                   for i in range(2) for b in range(3) for c in range(3) for j in range(2))
    assert logs["pull"] == pytest.approx(expected, abs=1e-5)
    own = sum(pull_constraint(s, p).item() for s, p in zip(similarity, picked))
    assert abs(own - expected) > 1  # a different term, not a rescaled one


def test_l2p_prompt_form_inserts_the_picked_prompts_after_cls_and_reads_their_mean():
    m = make("l2p", top_k=2, prompt_length=3)
    x = torch.randn(2, 1, 8, 8)
    picked = torch.tensor([[4, 1], [0, 9]])
    tokens = torch.cat([m.pool[picked[b]].reshape(1, 6, -1) for b in range(2)])
    out = encode_tokens(m.backbone, x, input_tokens=tokens)
    assert out.shape[1] == 1 + 6 + 16  # [CLS, 6 prompt tokens, 16 patches]
    torch.testing.assert_close(m.features(x, picked[None]), out[:, 1:7].mean(1))
    # the prompt tokens carry the class token's position embedding
    plain = encode_tokens(m.backbone, x, input_tokens=tokens + m.backbone.pos_embed[:, :1],
                          input_tokens_positioned=False)
    torch.testing.assert_close(plain, out, atol=1e-5, rtol=0)


def test_l2p_prefix_form_puts_the_picked_prompts_in_the_prefix_layers():
    """Each prompted block's prefix is the picked prompts' key / value halves for that block, in pick
    order (the one key set's picks serve every block); the head reads [CLS]."""
    m = make("l2p", form="prefix", prefix_layers=(0, 2), top_k=2)
    x = torch.randn(3, 1, 8, 8)
    _, picked = m.select(x)
    prefixes = {layer: prefix_prompt(m.pool[picked[0], i].permute(0, 2, 1, 3, 4).reshape(3, 2, -1, 64), m.num_heads)
                for i, layer in enumerate((0, 2))}
    expected = m.backbone.forward_head(encode_tokens(m.backbone, x, prefixes), pre_logits=True)
    torch.testing.assert_close(m.features(x, picked), expected)
    swapped = {0: prefixes[2], 2: prefixes[0]}  # the blocks' prompts exchanged: another output
    assert not torch.allclose(m.backbone.forward_head(encode_tokens(m.backbone, x, swapped), pre_logits=True),
                              expected, atol=1e-4)


def test_deep_l2p_plus_picks_with_its_own_keys_in_every_prefix_block():
    """CODA-Prompt's deep L2P++: per prompted block, its own keys pick its own top-k (the same
    query), the block's prefix is its picks, and each block's keys get their own pull term."""
    m = make("l2p", form="prefix", prefix_layers=(0, 2), top_k=2, layer_keys=True)
    assert m.keys.shape == (2, 10, 64)
    x = torch.randn(3, 1, 8, 8)
    similarity, picked = m.select(x)
    query = encode(m.backbone, x)
    for i in range(2):
        torch.testing.assert_close(similarity[i], F.cosine_similarity(query[:, None], m.keys[i][None], dim=-1),
                                   atol=1e-6, rtol=0)
        assert torch.equal(picked[i], top_keys(similarity[i], 2))
    assert not torch.equal(picked[0], picked[1])  # independent random keys pick differently here
    # block 0's prefix is set 0's picks, block 2's set 1's: [B, 2, k x length, D] each, in pick order
    prefixes = {layer: prefix_prompt(m.pool[picked[i], i].permute(0, 2, 1, 3, 4).reshape(3, 2, -1, 64), m.num_heads)
                for i, layer in enumerate((0, 2))}
    expected = m.backbone.forward_head(encode_tokens(m.backbone, x, prefixes), pre_logits=True)
    torch.testing.assert_close(m.features(x, picked), expected)
    task = TaskInfo(0, range(0, 2), T)
    m.begin_task(task)
    loss, logs = m.training_loss(x, torch.tensor([0, 1, 0]), task, m.phases(task)[0])
    assert logs["pull"] == pytest.approx(sum(pull_constraint(s, p).item() for s, p in zip(similarity, picked)),
                                         abs=1e-6)
    loss.backward()
    for i in range(2):
        touched = (m.keys.grad[i].abs().sum(1) > 0).nonzero().flatten().tolist()
        assert touched == sorted(set(picked[i].flatten().tolist()))
    presets = get_method("l2p").PRESETS
    assert presets["deep-l2p++"].layer_keys and not presets["l2p++"].layer_keys
    # CODA's ImageNet-R config: 50 epochs where CIFAR-100's trains 20
    assert [presets[n].epochs for n in ("l2p++", "deep-l2p++", "l2p++-imagenet-r", "deep-l2p++-imagenet-r")] == [
        20, 20, 50, 50]
    assert presets["deep-l2p++-imagenet-r"] == dataclasses.replace(presets["deep-l2p++"], epochs=50)
    with pytest.raises(ValueError, match="layer_keys applies to the prefix form only"):
        make("l2p", layer_keys=True)


HEAD_INITS = [("l2p", {}, True), ("dualprompt", {}, True), ("sprompt++", {}, True),
              ("l2p", {"head_init": "pytorch"}, False)]


@pytest.mark.parametrize("name,overrides,timm_init", HEAD_INITS)
def test_heads_start_as_their_reference_code_base_initialises_them(name, overrides, timm_init):
    """timm's ViT init (truncated normal, std 0.02, zero bias) in the l2p-/dualprompt-pytorch lineage;
    PyTorch's default (Kaiming-uniform, std 0.07 for 64 inputs, non-zero bias) in CODA's L2P++."""
    head = make(name, **overrides).head
    assert bool((head.bias == 0).all()) == timm_init
    assert (0.015 < head.weight.std().item() < 0.025) == timm_init
    assert get_method("l2p").PRESETS["l2p++"].head_init == "pytorch"


def test_l2p_dualprompt_pytorch_layout_is_the_reference_prepend_and_cls_head():
    """The L2P of HiDe/NoRGa's baseline trainer: the picked tokens are concatenated in front of the
    position-embedded sequence (no position embedding of their own) and the head reads [CLS]."""
    m = make("l2p", token_layout="dualprompt-pytorch", top_k=2, prompt_length=3)
    x = torch.randn(2, 1, 8, 8)
    picked = torch.tensor([[4, 1], [0, 9]])
    vit = m.backbone
    with torch.no_grad():
        h = torch.cat([m.pool[picked].reshape(2, 6, -1), vit._pos_embed(vit.patch_embed(x))], dim=1)
        for block in vit.blocks:
            h = block(h)
        expected = vit.norm(h)[:, 6]  # [CLS] sits after the 6 prompt tokens
        torch.testing.assert_close(m.features(x, picked[None]), expected, atol=1e-5, rtol=0)
        assert not torch.allclose(make("l2p", top_k=2, prompt_length=3).features(x, picked[None]), expected,
                                  atol=1e-3)
    with pytest.raises(ValueError, match="prompt form only"):
        make("l2p", form="prefix", token_layout="dualprompt-pytorch")


# --- DualPrompt -----------------------------------------------------------------------------
def e_prefix(method, slots, layer):
    """(keys, values) each sample gets in an E-prompt block, ``[B, H, length, d]``."""
    prefix = method.layer_prompts(slots)[layer](None)
    return prefix.keys, prefix.values


def test_dualprompt_compat_gather_matches_a_hand_built_reference_gather():
    """dualprompt-pytorch gathers ``[L, 2, B, ...]`` and reshapes it (no permute) to ``[L, B, 2, ...]``:
    sample b gets item 2b as its key and item 2b + 1 as its value of the (key/value, sample) grid."""
    m = scramble(begin(make("dualprompt", compat_reference_gather=True)))  # a distinct prompt per slot
    slots = torch.tensor([3, 0, 4, 1])
    B, heads = len(slots), m.num_heads
    layer = m.config.e_layers[0]
    as_heads = lambda p: p.reshape(p.shape[0], heads, -1).transpose(0, 1)  # noqa: E731  [length, D] -> [H, length, d]
    item = lambda j: as_heads(m.e_prompts[slots[j % B], 0, j // B])  # noqa: E731
    keys, values = e_prefix(m, slots, layer)
    for b in range(B):
        assert torch.equal(keys[b], item(2 * b)) and torch.equal(values[b], item(2 * b + 1))
    # the default gather pairs each sample's own key and value halves
    fair = scramble(begin(make("dualprompt")))
    keys, values = e_prefix(fair, slots, layer)
    for b, t in enumerate(slots.tolist()):
        assert torch.equal(keys[b], as_heads(fair.e_prompts[t, 0, 0]))
        assert torch.equal(values[b], as_heads(fair.e_prompts[t, 0, 1]))
    # in training every sample takes task t's slot: the first half gets (key, key), the second (value, value)
    keys, values = e_prefix(m, torch.full((4,), 2), layer)
    assert torch.equal(keys[0], values[0]) and torch.equal(keys[0], as_heads(m.e_prompts[2, 0, 0]))
    assert torch.equal(keys[3], values[3]) and torch.equal(keys[3], as_heads(m.e_prompts[2, 0, 1]))


@pytest.mark.parametrize("name", ["dualprompt", "sprompt++"])
def test_dualprompt_compat_gather_makes_predictions_depend_on_the_batch(name):
    m = scramble(begin(make(name, compat_reference_gather=True)))
    x = digit_images(12)
    with torch.no_grad():  # logits, not argmaxes, which may agree by chance
        alone = torch.cat([m.logits(x[i:i + 1]) for i in range(len(x))])
        assert not torch.allclose(m.logits(x), alone, atol=1e-3)


@pytest.mark.parametrize("name", ["l2p", "dualprompt", "sprompt++"])
def test_compat_unmasked_test_logits_lets_an_unseen_class_win(name):
    x = digit_images(4)
    for compat in (False, True):
        m = make(name, compat_unmasked_test_logits=compat)
        m.begin_task(TaskInfo(0, range(0, 2), T))
        with torch.no_grad():
            m.head.bias[7] = 1e6  # an untrained row of a class not seen yet
        predicted = set(m.predict(x).tolist())
        assert predicted == {7} if compat else predicted <= {0, 1}


def test_sprompt_plus_plus_is_dualprompt_e_prompts_without_a_g_prompt():
    m = begin(make("sprompt++"))
    assert sorted(m.layer_prompts(torch.tensor([0, 1]))) == [0, 1, 2] and len(m.g_prompt.prefixes) == 0
    paper = get_method("sprompt++").PRESETS["paper"]
    assert (paper.g_layers, paper.e_layers, paper.e_length) == ((), (0, 1, 2, 3, 4), 20)
    assert get_method("sprompt++").REFERENCE_CODE_BASE == "hide"


def test_dualprompt_trains_with_the_true_task_prompt_and_infers_it_from_the_keys():
    m = begin(make("dualprompt"), tasks=3)
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():  # make image b's query closest to key b % 3
        m.keys[:3] = encode(m.backbone, x[:3])
    slots = m.infer_slots(x[:3])
    assert slots.tolist() == [0, 1, 2]
    pred, details = m.predict_with_details(x[:3])
    assert details["task"].tolist() == [0, 1, 2]
    # training on task 1 uses E-prompt 1 for every sample, whatever the keys say
    task = TaskInfo(1, range(2, 4), T)
    loss, logs = m.training_loss(x, torch.tensor([2, 3, 2, 3, 2, 3]), task, m.phases(task)[0])
    loss.backward()
    assert m.e_prompts.grad[1].abs().sum() > 0 and m.e_prompts.grad[[0, 2]].abs().sum() == 0
    assert m.keys.grad[1].abs().sum() > 0 and m.keys.grad[[0, 2]].abs().sum() == 0


def test_dualprompt_never_picks_an_unseen_tasks_key_and_copies_the_previous_prompt():
    m = begin(make("dualprompt"), tasks=2)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        m.keys[4] = encode(m.backbone, x[:1])[0]  # a future task's key matching the query exactly
    assert m.infer_slots(x[:1]).item() in (0, 1)
    reference = begin(make("dualprompt", compat_match_all_keys=True), tasks=2)
    reference.load_state_dict(m.state_dict())
    assert reference.infer_slots(x[:1]).item() == 4  # the reference scores every key of the pool
    with torch.no_grad():
        m.e_prompts[1].add_(1.0)
    m.begin_task(TaskInfo(2, range(4, 6), T))
    assert torch.equal(m.e_prompts[2], m.e_prompts[1])


def test_coda_dualprompt_picks_an_e_prompt_per_block_and_starts_each_task_afresh():
    """CODA-Prompt's DualPrompt (layer_keys): every E block scores its own keys and takes its own
    top-1 task at test time, trains every block on the true task and pulls each block's key of it;
    a new task's E-prompt keeps its own initialisation (start_from_previous=False)."""
    m = scramble(begin(make("dualprompt", layer_keys=True, start_from_previous=False), tasks=3))
    assert m.keys.shape == (len(m.config.e_layers), T, m.embed_dim)
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():  # block 0's keys match the query at task 2, block 1's at task 0
        m.keys[0, 2] = encode(m.backbone, x)[0]
        m.keys[1, 0] = encode(m.backbone, x)[0]
    slots = m.infer_slots(x)
    assert slots[:, 0].tolist() == [2, 0]
    for i, layer in enumerate(m.config.e_layers):
        keys, values = e_prefix(m, slots, layer)
        own = prefix_prompt(m.e_prompts[slots[i], i], m.num_heads)(None)
        assert torch.equal(keys, own.keys) and torch.equal(values, own.values)
    assert m.predict_with_details(x)[1]["task"].tolist() == [2]  # the first E block's pick
    task = TaskInfo(1, range(2, 4), T)
    loss, _ = m.training_loss(torch.randn(4, 1, 8, 8), torch.tensor([2, 3, 2, 3]), task, m.phases(task)[0])
    loss.backward()
    assert (m.keys.grad[:, 1].abs().sum(-1) > 0).all() and m.keys.grad[:, [0, 2]].abs().sum() == 0
    assert m.e_prompts.grad[1].abs().sum() > 0 and m.e_prompts.grad[[0, 2]].abs().sum() == 0
    before = m.e_prompts[3].clone()
    m.begin_task(TaskInfo(3, range(6, 8), T))
    assert torch.equal(m.e_prompts[3], before)


def test_coda_dualprompt_presets_are_codas_script():
    """experiments/cifar-100.sh --prompt_param 10 20 6 (E: 20 tokens = 10 key + 10 value; G: 6 = 3 + 3)
    with configs/{cifar-100,imnet-r}_prompt.yaml: Adam 1e-3, cosine, batch 128, 20 / 50 epochs."""
    presets = get_method("dualprompt").PRESETS
    coda = presets["coda-cifar100"]
    assert (coda.e_length, coda.g_length, coda.layer_keys, coda.start_from_previous) == (10, 3, True, False)
    assert (coda.lr, coda.batch_size, coda.schedule, coda.grad_clip, coda.init_range, coda.head_init) == (
        1e-3, 128, "coda_cosine", 0.0, (0.0, 1.0), "pytorch")
    assert (coda.epochs, presets["coda-imagenet-r"].epochs) == (20, 50)


def test_l2p_prompt_mask_trains_each_tasks_block_and_shared_pool_chains_the_blocks():
    """l2p-pytorch's use_prompt_mask: task t trains prompts [t k, (t + 1) k) whatever the queries
    select, and pulls their keys; tests select freely. shared_prompt_pool: task t's block starts
    as task t - 1's. Tasks past the pool's end (here T = 5 tasks x top-3 > 10) select freely."""
    m = make("l2p", prompt_mask=True, shared_prompt_pool=True)
    with torch.no_grad():
        m.pool.copy_(torch.randn_like(m.pool))
    begin(m, tasks=2)
    torch.testing.assert_close(m.pool[3:6], m.pool[0:3])  # task 1's block from task 0's
    assert not torch.equal(m.pool[6:9], m.pool[0:3])
    task = TaskInfo(1, range(2, 4), T)
    images, labels = torch.randn(6, 1, 8, 8), torch.tensor([2, 3] * 3)
    assert m.select(images, training_task=1)[1].tolist() == [[[3, 4, 5]] * 6]
    free = m.select(images)[1]
    assert torch.equal(free[0], top_keys(m.select(images)[0][0], 3))  # a test pass: the top-k
    loss, _ = m.training_loss(images, labels, task, m.phases(task)[0])
    loss.backward()
    trained = m.pool.grad.flatten(1).abs().sum(1) > 0
    assert trained.tolist() == [i in (3, 4, 5) for i in range(10)]
    assert (m.keys.grad.abs().sum(1) > 0).tolist() == [i in (3, 4, 5) for i in range(10)]
    assert m.task_block(3) is None and m.select(images, training_task=3)[1].shape == (1, 6, 3)
    before = m.pool.detach().clone()
    m.begin_task(TaskInfo(3, range(6, 8), T))  # past the pool's end nothing is copied
    assert torch.equal(m.pool, before)


def test_five_datasets_presets_follow_the_reference_configs_and_scripts():
    """DualPrompt and S-Prompt++ have only NoRGa's 5-datasets config, whose Sup-21K scripts train 40
    epochs where its iBOT-21K ones keep the config's 20; L2P's own is l2p-pytorch's, NoRGa's explicit."""
    picked = {(n, b): get_method(n).preset_for("five_datasets", b, None, 5)
              for n in ("dualprompt", "sprompt++") for b in ("sup21k", "ibot21k")}
    assert {k: c.epochs for k, c in picked.items()} == {(n, b): 40 if b == "sup21k" else 20 for n, b in picked}
    assert all((c.batch_size, c.lr, c.pull_weight) == (128, 0.0025, 0.5) for c in picked.values())
    dual, spp = picked[("dualprompt", "sup21k")], picked[("sprompt++", "sup21k")]
    assert (dual.g_length, dual.e_length, dual.g_layers, spp.e_length, spp.g_layers) == (10, 40, (0, 1), 40, ())
    l2p = get_method("l2p")
    own, norga = l2p.preset_for("five_datasets", "sup21k"), l2p.PRESETS["norga-5datasets"]
    assert (own.pool_size, own.prompt_length, own.top_k, own.pull_weight) == (20, 10, 4, 0.5)
    assert (own.epochs, own.lr, own.token_layout) == (5, 0.001875, "l2p-pytorch")  # no script settings
    assert (norga.epochs, norga.lr, norga.token_layout) == (20, 0.0025, "dualprompt-pytorch")
    # NoRGa's Sup-21K script trains its config 40 epochs; l2p-pytorch's own and other presets get no script
    assert l2p.preset_for("five_datasets", "sup21k", "norga-5datasets").epochs == 40
    assert l2p.preset_for("five_datasets", "ibot21k", "norga-5datasets").epochs == 20
    dualprompt = get_method("dualprompt")
    assert [dualprompt.preset_for("five_datasets", "sup21k", p).epochs for p in ("5datasets", "paper", "imagenet-r")] == [
        40, 5, 50]
    # l2p-pytorch partitions the pool by task in training and chains the blocks; NoRGa's config does not
    assert (own.prompt_mask, own.shared_prompt_pool, norga.prompt_mask, norga.shared_prompt_pool) == (
        True, True, False, False)
    # a script's settings never reach the small preset
    small = get_method("dualprompt").PRESETS["small"]
    assert get_method("dualprompt").preset_for("five_datasets", "sup21k", "small") == small and small.epochs != 40


def test_l2p_imagenet_r_default_is_norgas_published_config():
    """Neither l2p-pytorch nor google-research/l2p ships an ImageNet-R L2P config; NoRGa's (MoE_PromptCL
    configs/imr_l2p.py, run by its scripts at batch 128) is the one a run without --preset gets."""
    l2p = get_method("l2p")
    config = l2p.preset_for("imagenet_r", "sup21k", None, 10)
    assert config == l2p.PRESETS["norga-imagenet-r"]
    assert (config.token_layout, config.pool_size, config.prompt_length, config.top_k, config.pull_weight) == (
        "dualprompt-pytorch", 30, 5, 5, 0.1)
    assert (config.epochs, config.batch_size, config.lr, config.schedule) == (50, 128, 0.0025, "constant")


@pytest.mark.parametrize("name", ["l2p", "dualprompt", "sprompt++"])
def test_norga_cub_presets_step_the_rate_on_the_first_task_only(name):
    """NoRGa's baseline trainer on CUB: timm's StepLR (x0.1 every 30 epochs) stepped after each epoch
    with that epoch's index, and bound to the first task's optimizer; later tasks keep the base rate."""
    cls = get_method(name)
    config = cls.preset_for("cub200", "sup21k")
    assert (config.epochs, config.lr, config.batch_size, config.schedule) == (50, 0.0025, 128, "norga_cub")
    m = make(name, schedule="norga_cub", epochs=50)
    first, later = (m.phases(TaskInfo(t, range(2 * t, 2 * t + 2), T))[0].lr_factor for t in (0, 1))
    per_epoch = [first(10 * e, 500) for e in range(50)]  # 10 iterations per epoch
    assert per_epoch == [1.0] * 31 + [pytest.approx(0.1)] * 19  # epoch e trains at 0.1 ** ((e - 1) // 30)
    assert later is None


def test_vqprompt_presets_follow_the_official_configs_per_benchmark():
    vq = get_method("vqprompt")
    picked = {(d, t): vq.preset_for(d, None, None, t)
              for d, t in (("cifar100", 10), ("imagenet_r", 10), ("imagenet_r", 5), ("imagenet_r", 20), ("cub200", 10))}
    assert {k: (c.batch_size, c.lr, c.schedule, c.lr_hold_iters, c.ca_samples_per_class, c.temperature)
            for k, c in picked.items()} == {("cifar100", 10): (128, 0.0025, "hold-cosine", 80, 512, 1.0),
                                            ("imagenet_r", 10): (64, 0.0025, "hold-cosine", 40, 256, 1.0),
                                            ("imagenet_r", 5): (64, 0.0025, "hold-cosine", 80, 256, 1.0),
                                            ("imagenet_r", 20): (64, 0.0025, "hold-cosine", 20, 256, 1.0),
                                            ("cub200", 10): (128, 0.0025, "epoch-cosine", 0, 256, 5.0)}


# --- CODA-Prompt ----------------------------------------------------------------------------
def test_coda_orthogonality_penalty_is_zero_exactly_for_orthonormal_rows():
    q, _ = torch.linalg.qr(torch.randn(16, 5, dtype=torch.float64))
    assert orthogonality_penalty(q.T).item() == pytest.approx(0.0, abs=1e-12)
    rows = q.T.clone()
    rows[1] = rows[0]
    # rows 0 and 1 now coincide: entries (0,1) and (1,0) of R R^T - I are 1
    assert orthogonality_penalty(rows).item() == pytest.approx(2 / 25, abs=1e-12)


def test_coda_gram_schmidt_makes_new_rows_orthonormal_to_old_ones_and_keeps_the_old():
    old = torch.randn(6, 3, 4)  # the earlier rows are not orthogonal (trained components)
    g = torch.Generator().manual_seed(0)
    new = gram_schmidt_rows(old, 2, 4, g)
    assert torch.equal(new[:2], old[:2]) and torch.equal(new[4:], torch.zeros(2, 3, 4))
    flat = new.flatten(1).double()
    gram = flat[:4] @ flat[2:4].T
    torch.testing.assert_close(gram[2:], torch.eye(2, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(gram[:2], torch.zeros(2, 2, dtype=torch.float64), atol=1e-6, rtol=0)


def reference_gram_schmidt(rows, start, stop, draws):
    """CODA-Prompt's ``gram_schmidt`` (models/zoo.py) restated: new row k is its draw minus the sum of
    the draw's projections onto every row j < k, each taken on its own, kept unnormalised until all
    new rows are made; the rows after ``stop`` are zero."""
    u = torch.zeros_like(rows)
    u[:start] = rows[:start]
    for k in range(start, stop):
        v = draws[k - start]
        u[k] = v - sum((((v * u[j]).sum() / (u[j] * u[j]).sum()) * u[j] for j in range(k)), torch.zeros_like(v))
    for k in range(start, stop):
        u[k] = u[k] / u[k].norm()
    return u


def test_coda_compat_gram_schmidt_is_the_references_per_row_projection():
    """On drifted earlier rows (orthonormal plus training-like noise) the compat procedure is the
    reference's, whose new rows are then only roughly orthogonal to the old; the default's are
    orthonormal to them. On still-orthonormal rows the two agree."""
    q = torch.linalg.qr(torch.randn(48, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))).Q.T
    drift = 0.2 * torch.randn(8, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    drifted = (q + drift).reshape(8, 2, 3, 8)  # [M, 2, length, D], as a layer's components
    seeded = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    g = seeded()
    draws = [torch.randn(48, generator=g, dtype=torch.float64) for _ in range(3)]  # one per new row, in order
    compat = gram_schmidt_rows(drifted, 3, 6, seeded(), reference=True).flatten(1)
    torch.testing.assert_close(compat, reference_gram_schmidt(drifted.flatten(1), 3, 6, draws), atol=1e-12, rtol=0)
    default = gram_schmidt_rows(drifted, 3, 6, seeded()).flatten(1)
    old = drifted.flatten(1)[:3]
    assert (default[3:6] @ old.T).abs().max() < 1e-12
    torch.testing.assert_close(default[3:6] @ default[3:6].T, torch.eye(3, dtype=torch.float64), atol=1e-12, rtol=0)
    assert (compat[3:6] @ old.T).abs().max() > 1e-3  # the reference's rows lean on the drifted ones
    orthonormal = q.reshape(8, 2, 3, 8)
    torch.testing.assert_close(gram_schmidt_rows(orthonormal, 3, 6, seeded(), reference=True),
                               gram_schmidt_rows(orthonormal, 3, 6, seeded()), atol=1e-12, rtol=0)
    # the switch reaches a task's initialisation: task 1's rows lean on task 0's drifted ones only with it
    for switch in (False, True):
        m = begin(make("coda", compat_reference_gram_schmidt=switch), tasks=1)
        with torch.no_grad():
            m.components[:, :4] += 0.2 * torch.randn(m.components[:, :4].shape)
        m.begin_task(TaskInfo(1, range(2, 4), T))
        flat = m.components[0].flatten(1).double()
        assert ((flat[4:8] @ flat[:4].T).abs().max() > 1e-3) == switch


def test_coda_old_components_do_not_change_after_their_task(tmp_path, monkeypatch):
    """Training moves each task's own rows away from their Gram-Schmidt start and leaves earlier tasks'."""
    run = resolve_run(RunSpec(method="coda", dataset="digits", pretrained=False,
                              overrides={"epochs": 1, "ortho_weight": 0.1}))
    names = ("components", "keys", "attention")
    by_instance, ended = {}, []  # (the engine's cost measurement begins a task on a CODA of its own)
    begin_task = get_method("coda").begin_task

    def begin_and_keep(self, task):
        begin_task(self, task)
        by_instance.setdefault(id(self), []).append({k: getattr(self, k).detach().clone() for k in names})

    def keep(report):
        state = torch.load(report.checkpoint, weights_only=True)["state"]
        ended.append({k: state[k].clone() for k in names})

    monkeypatch.setattr(get_method("coda"), "begin_task", begin_and_keep)
    run_sequence(run, tmp_path, on_task_end=keep)
    (started,) = [begins for begins in by_instance.values() if len(begins) == 5]  # the run's own method
    per_task = 20 // 5
    for t in range(5):
        own = slice(t * per_task, (t + 1) * per_task)
        for name in names:
            assert not torch.equal(ended[t][name][:, own], started[t][name][:, own]), (name, t)
            if t:
                earlier = ended[t - 1][name][:, :t * per_task]
                assert torch.equal(ended[t][name][:, :t * per_task], earlier), (name, t)


def test_coda_weights_are_cosine_of_query_times_attention_with_key():
    from promptcl.core.prompts import prefix_prompt

    m = begin(make("coda"), tasks=1)  # 4 active components per layer
    x = torch.randn(2, 1, 8, 8)
    q = encode(m.backbone, x)

    def composed(i):  # by hand: alpha_bj = cos(q_b * A_j, K_j), prompt_b = sum_j alpha_bj P_j
        alpha = torch.tensor([[F.cosine_similarity(q[b] * m.attention[i, j], m.keys[i, j], dim=0).item()
                               for j in range(4)] for b in range(2)])
        return torch.einsum("bm,mkpd->bkpd", alpha, m.components[i, :4])

    prompts = {layer: prefix_prompt(composed(i), m.num_heads) for i, layer in enumerate(m.config.prompt_layers)}
    torch.testing.assert_close(m.features(x), encode(m.backbone, x, prompts), atol=1e-5, rtol=0)


def test_coda_a_task_trains_its_own_components_keys_and_attention_only():
    """On task 1 (of 5, 4 components each) the loss reaches rows 4-7 of P, K and A: the rows of
    task 0 are used detached and those of later tasks are not used at all."""
    m = begin(make("coda"), tasks=2)
    task = TaskInfo(1, range(2, 4), T)
    loss, _ = m.training_loss(torch.randn(4, 1, 8, 8), torch.tensor([2, 3, 2, 3]), task, m.phases(task)[0])
    loss.backward()
    for name in ("components", "keys", "attention"):
        per_row = getattr(m, name).grad.flatten(2).abs().sum(-1)  # [layer, M]
        assert (per_row[:, 4:8] > 0).all(), name
        assert not per_row[:, :4].any() and not per_row[:, 8:].any(), name


# --- S-Prompt -------------------------------------------------------------------------------
def test_sprompt_centroids_pick_the_right_task_on_separable_data():
    m = make("sprompt")
    # task t's images: a distinct constant level plus noise, far apart in feature space
    levels = [-3.0, -1.0, 1.0, 3.0, 5.0]
    g = torch.Generator().manual_seed(0)
    images = lambda t, n: levels[t] + 0.05 * torch.randn(n, 1, 8, 8, generator=g)  # noqa: E731
    for t in range(T):
        task = TaskInfo(t, range(2 * t, 2 * t + 2), T)
        m.begin_task(task)
        batches = lambda t=t, augmented=False: [(images(t, 20), torch.full((20,), 2 * t))]  # noqa: E731
        m.end_task(task, batches, lambda name: None)
    test = torch.cat([images(t, 8) for t in range(T)])
    pred, details = m.predict_with_details(test)
    assert details["task"].tolist() == [t for t in range(T) for _ in range(8)]
    # each sample is classified among its inferred task's classes only
    assert all(2 * t <= p < 2 * t + 2 for p, t in zip(pred.tolist(), details["task"].tolist()))


def test_sprompt_task_is_that_of_the_nearest_single_centroid_by_l1_by_hand():
    """A query goes to the task owning its nearest centroid (the minimum over each task's K, not
    their mean), by L1 distance as the code (l2 on request). In 2 of D dimensions, q = e0:
    A = (0.5, 0.5) is 1.0 away in L1 and 0.71 in L2; B = (0.1, 0) is 0.9 either way."""
    m = make("sprompt")
    D, K = m.embed_dim, m.config.centroids_per_task

    def point(x, y):
        v = torch.zeros(D)
        v[0], v[1] = x, y
        return v

    def infer(method, centroids):
        method.frozen_features = lambda images, **_: images  # the queries are the features themselves
        method.centroids[:2] = torch.stack([torch.stack(c) for c in centroids])
        method.seen_tasks.fill_(2)
        return method.infer_tasks(point(1.0, 0.0)[None]).item()

    apart = [[point(0.5, 0.5)] * K, [point(0.1, 0.0)] * K]
    assert infer(m, apart) == 1
    assert infer(make("sprompt", centroid_distance="l2"), apart) == 0
    # task 0: one centroid on the query and K - 1 at -q (L1 distance 2); task 1: all at B (0.9)
    one_close = [[point(1.0, 0.0)] + [point(-1.0, 0.0)] * (K - 1), [point(0.1, 0.0)] * K]
    assert infer(m, one_close) == 0


def test_sprompt_first_task_has_its_own_weight_decay():
    m = make("sprompt", first_task_weight_decay=5e-4, weight_decay=2e-4)
    assert [m.phases(TaskInfo(t, range(2 * t, 2 * t + 2), T))[0].weight_decay for t in range(3)] == [5e-4, 2e-4, 2e-4]


def test_kmeans_centroids_are_the_cluster_means():
    a, b = torch.zeros(5, 3), torch.ones(7, 3) * 4
    centroids = kmeans_centroids(torch.cat([a, b]), 2)
    assert sorted(centroids[:, 0].tolist()) == [0.0, 4.0]


# --- OVOR -----------------------------------------------------------------------------------
def test_kth_neighbour_distance_by_hand():
    """On a line, reference points 0, 1, 3: the 2nd nearest of 0 (itself first) is 1 away, of 10 is
    9 away; k beyond the reference size takes the farthest; chunks change nothing."""
    reference = torch.tensor([[0.0], [1.0], [3.0]])
    points = torch.tensor([[0.0], [10.0]])
    assert kth_neighbour_distance(points, reference, 2).tolist() == [1.0, 9.0]
    assert kth_neighbour_distance(points, reference, 1).tolist() == [0.0, 7.0]
    assert kth_neighbour_distance(points, reference, 5, chunk=1).tolist() == [3.0, 10.0]


def test_virtual_outliers_lie_outside_the_data_and_the_reference_mode_collapses():
    # a task's features densely on a 2-D sheet in 16 dimensions (0.17 at most between neighbours);
    # the candidates' noise (norm about 0.1 x 4 = 0.4) points mostly off it
    feats = torch.zeros(400, 16)
    feats[:, 0] = 4.0
    feats[:, 1:3] = 2 * torch.rand(400, 2, generator=torch.Generator().manual_seed(0)) - 1
    normed = F.normalize(feats, dim=1)
    args = dict(count=40, neighbours=10, boundary_points=20, candidates_per_point=50, noise_scale=0.1)
    outliers = virtual_outliers(feats, generator=torch.Generator().manual_seed(1), **args)
    assert outliers.shape == (40, 16)
    # every outlier farther from the data than any data point from its nearest neighbour: off the
    # data, not on its boundary points (which a tiny noise_scale would return)
    spacing = torch.cdist(feats, feats).fill_diagonal_(float("inf")).min(dim=1).values
    assert torch.cdist(outliers, feats).min(dim=1).values.min() > spacing.max()
    # in directions farther from the data's (k-th neighbour distance) than the typical data point's
    ranks = kth_neighbour_distance(F.normalize(outliers, dim=1), normed, 10)
    assert ranks.min() > kth_neighbour_distance(normed, normed, 10).median()
    assert (ranks[:-1] >= ranks[1:]).all()  # farthest first: the code's steps take them in this order
    # around boundary features in the head's feature space (noise of norm about 0.1 x 4 = 0.4):
    # a scaled-up feature set gets outliers at its own scale, not near the origin
    big = virtual_outliers(30 * feats, generator=torch.Generator().manual_seed(1), **args)
    for data, points in ((feats, outliers), (30 * feats, big)):
        nearest = torch.cdist(points, data).min(dim=1).values
        assert (nearest < 0.8).all() and (nearest > 0).all()
    reference = virtual_outliers(30 * feats, generator=torch.Generator().manual_seed(1), around_origin=True, **args)
    assert len(torch.unique(reference, dim=0)) <= 50 and reference.norm(dim=1).max() < 0.6


def test_ovor_vor_phase_trains_only_the_head(tmp_path):
    m = begin(make("ovor", neighbours=5, boundary_points=5, candidates_per_point=10), tasks=1)
    task = TaskInfo(0, range(0, 2), T)
    prompt = [p.detach().clone() for p in m.prompt.parameters()]
    head = m.head.weight.detach().clone()
    x = torch.randn(20, 1, 8, 8)
    labels = torch.tensor([0, 1] * 10)
    snapshots = []
    m.end_task(task, lambda: [(x, labels)], snapshots.append)
    assert snapshots == ["before_vor"]
    assert all(torch.equal(a, b) for a, b in zip(prompt, m.prompt.parameters()))
    assert not torch.equal(head, m.head.weight)


def test_ovor_outlier_epochs_continue_the_training_adam_on_fresh_augmented_passes():
    """As the code: the training phase's Adam carries on (its step count goes on from the training
    steps; the prompt, without gradient, keeps its state), and each outlier epoch encodes the task's
    augmented images afresh; vor_augmented=False encodes them once."""
    for vor_augmented, passes in ((True, 3 * 20), (False, 20)):
        m = begin(make("ovor", vor_epochs=3, epochs=1, batch_size=10, neighbours=5, boundary_points=5,
                       candidates_per_point=10, vor_augmented=vor_augmented), tasks=1)
        m.training_augmented = True
        task = TaskInfo(0, range(0, 2), T)
        x, labels = torch.randn(20, 1, 8, 8), torch.tensor([0, 1] * 10)
        phase = m.phases(task)[0]
        train_phase(m, phase, task, _ListLoader([(x[:10], labels[:10]), (x[10:], labels[10:])]), torch.device("cpu"),
                    progress=False)
        optimizer = m._train_optimizer
        prompt_steps = {id(p): optimizer.state[p]["step"].item() for p in m.prompt.parameters()}
        requested = []
        m.end_task(task, lambda augmented=False: requested.append(augmented) or [(x, labels)], lambda name: None)
        assert requested == [vor_augmented]
        assert m.end_of_task_pass_images["prompted"] == passes
        assert optimizer.state[m.head.weight]["step"].item() == 2 + 3 * 2  # 2 training steps, then 2 per epoch
        assert {id(p): optimizer.state[p]["step"].item() for p in m.prompt.parameters()} == prompt_steps
        assert m._train_optimizer is None
    fresh = begin(make("ovor", vor_epochs=1, epochs=1, batch_size=10, neighbours=5, boundary_points=5,
                       candidates_per_point=10, vor_fresh_optimizer=True), tasks=1)
    train_phase(fresh, fresh.phases(task)[0], task, _ListLoader([(x[:10], labels[:10])]), torch.device("cpu"),
                progress=False)
    kept, head = fresh._train_optimizer, fresh.head.weight.detach().clone()
    fresh.end_task(task, lambda augmented=False: [(x, labels)], lambda name: None)
    assert kept.state[fresh.head.weight]["step"].item() == 1  # the outlier epoch stepped another Adam
    assert not torch.equal(fresh.head.weight, head)


class _RecordingOptimizer:
    """Stands in for the continued Adam: records each step's gradients and rate, moves nothing."""

    def __init__(self, params):
        self.params = list(params)
        self.param_groups = [{"params": self.params, "lr": 0.0}]
        self.steps = []

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None

    def step(self):
        self.steps.append((self.param_groups[0]["lr"], [p.grad.clone() for p in self.params]))


@pytest.mark.parametrize("vor_outliers", [True, False])
def test_ovor_outlier_step_loss_is_ce_plus_huber_energy_hinges_on_the_task_logits_by_hand(vor_outliers):
    """Each outlier step's gradient is that of CE over the task's classes + vor_weight x Huber of
    relu(E_id - id_threshold) + vor_weight x Huber of relu(ood_threshold - E_ood), with the free
    energy E = -logsumexp over the current task's logits only, each step taking its equal share of
    the outliers (farthest first); the rate is lr x the cosine over training + outlier epochs.
    ``vor_outliers=False`` drops the outlier term and keeps the batches."""
    m = make("ovor", epochs=1, vor_epochs=1, batch_size=10, neighbours=5, boundary_points=5,
             candidates_per_point=10, outliers_per_class=3, vor_outliers=vor_outliers)
    c = m.config
    task = TaskInfo(1, range(2, 4), T)
    with torch.no_grad():  # every logit near 4: E_id ~ -4.7 (above -15), E_ood ~ -4.7 (below -3)
        m.head.bias.fill_(4.0)
    g = torch.Generator().manual_seed(3)
    feats, labels = 0.3 * torch.randn(20, m.embed_dim, generator=g), torch.tensor([2, 3] * 10)
    recorder = _RecordingOptimizer(m.head.parameters())
    m.train_head_with_outliers(task, lambda: (feats, labels), recorder)
    generator = torch.Generator().manual_seed(torch.initial_seed() + task.index)
    outliers = virtual_outliers(feats, count=6, neighbours=5, boundary_points=5, candidates_per_point=10,
                                noise_scale=c.noise_scale, generator=generator)
    order = torch.randperm(20, generator=generator)

    def huber(x):  # delta 1, mean over the batch
        return torch.where(x.abs() < 1, 0.5 * x ** 2, x.abs() - 0.5).mean()

    def free_energy(x):
        return -torch.logsumexp(m.head(x)[:, 2:4], dim=1)

    assert len(recorder.steps) == 2
    for s, (lr, grads) in enumerate(recorder.steps):
        idx, ood = order[10 * s:10 * (s + 1)], outliers[3 * s:3 * (s + 1)]
        outlier_term = c.vor_weight * huber(F.relu(c.ood_threshold - free_energy(ood)))
        assert outlier_term > 0.01  # active here: leaving it out changes the gradient
        loss = (F.cross_entropy(m.head(feats[idx])[:, 2:4], labels[idx] - 2)
                + c.vor_weight * huber(F.relu(free_energy(feats[idx]) - c.id_threshold))
                + (outlier_term if vor_outliers else 0))
        expected = torch.autograd.grad(loss, list(m.head.parameters()))
        for got, want in zip(grads, expected):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        assert lr == pytest.approx(c.lr * math.cos(99 * math.pi / 200))  # epoch 1 of 2: the cosine's end


def test_a_phase_clips_the_gradient_norm_and_follows_its_schedule():
    """train_phase: the update of a clipped SGD step at lr 1 has the clip's norm; the rate follows
    the phase's factor per iteration (hold_then_cosine: held at the floor, then cosine from 1)."""
    m = begin(make("ovor"), tasks=1)
    task = TaskInfo(0, range(0, 2), T)
    weight = torch.nn.Parameter(torch.zeros(5))
    m.training_loss = lambda images, labels, task, phase: (1000 * weight.sum(), {})
    batches = _ListLoader([(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))] * 2)
    rates = []
    factor = hold_then_cosine(2, 0.01)
    phase = Phase("p", 2, [{"params": [weight], "lr": 1.0}], grad_clip=1e-3, optimizer="sgd", momentum=0.0,
                  lr_factor=lambda it, total: rates.append(factor(it, total)) or factor(it, total))
    train_phase(m, phase, task, batches, torch.device("cpu"), progress=False)
    steps = [0.01, 0.01, 1.0, 0.5 * 0.99 + 0.01]  # iterations 0-3 of 2 x 2: hold, hold, cosine at 0 and 1/2
    assert rates[:4] == pytest.approx(steps)
    # each step moves every coordinate by -rate x 1e-3 / sqrt(5) (the clipped gradient's norm is 1e-3)
    torch.testing.assert_close(weight.detach(), torch.full((5,), -sum(steps) * 1e-3 / 5 ** 0.5))
    assert factor(100, 100) == pytest.approx(0.01)


def reference_iter_schedule(base: float, final: float, *, iter_step: int, epochs: int, hold: int,
                            updates: int, first: float | None = None) -> list[float]:
    """The rate of each update under SMoPE's / VQ-Prompt's ``CosineSchedulerIter`` (utils/schedulers.py),
    restated from its mechanics: the schedule is ``final`` for ``hold`` iterations, then a cosine from
    ``base`` to ``final`` over the rest of ``iter_step * epochs``; the constructor sets the group's rate
    (``first``: its optimizer group's own rate, ``base`` unless given) and leaves the iteration counter
    at -1; after each update the counter advances and the rate becomes the schedule's entry there
    (``final`` past its end)."""
    total = iter_step * epochs
    schedule = [final] * hold + [final + 0.5 * (base - final) * (1 + math.cos(math.pi * j / (total - hold)))
                                 for j in range(total - hold)]
    rates, rate, counter = [], base if first is None else first, -1
    for _ in range(updates):
        rates.append(rate)
        counter += 1
        rate = schedule[counter] if counter < total else final
    return rates


@pytest.mark.parametrize("iter_step", [4, 2])  # the schedule outlasts the phase's 6 updates / ends before them
def test_the_reference_iteration_schedule_and_its_first_step_are_reproduced_on_request(iter_step):
    """compat_schedule_iter_step lays the held cosine over iter_step x epochs updates, whatever the
    phase's real count; compat_first_step_at_base_lr gives the first update the base rate. Read from
    the optimizer's groups at each of train_phase's updates."""
    m = begin(make("vqprompt", epochs=2, lr_hold_iters=2, min_lr=1e-4, compat_schedule_iter_step=iter_step,
                   compat_first_step_at_base_lr=True), tasks=1)
    task = TaskInfo(0, range(0, 2), T)
    phase, = m.phases(task)
    rates = []
    m.training_loss = lambda images, labels, task, phase: (
        rates.append([g["lr"] for g in phase.param_groups]) or m.head.weight.sum(), {})
    batches = _ListLoader([(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))] * 3)
    train_phase(m, phase, task, batches, torch.device("cpu"), progress=False)
    c = m.config
    for group, base in enumerate((c.lr * c.prompt_lr_multiplier, c.lr)):
        expected = reference_iter_schedule(base, c.min_lr, iter_step=iter_step, epochs=2, hold=2, updates=6)
        assert [r[group] for r in rates] == pytest.approx(expected, rel=1e-9, abs=0)
    default = make("vqprompt", epochs=2, lr_hold_iters=2, min_lr=1e-4).phases(task)[0].lr_factor[1]
    assert [default(it, 6) for it in range(3)] == pytest.approx([0.01, 0.01, 1.0])  # real steps, held first
    with pytest.raises(ValueError, match="compat_schedule_iter_step applies to the hold-cosine schedule only"):
        make("vqprompt", schedule="epoch-cosine", compat_schedule_iter_step=40)


def test_the_reference_alignment_takes_its_first_step_at_ten_times_the_scheduled_rate(monkeypatch):
    """SMoPE's / VQ-Prompt's alignment optimizer group has the rate ``ca_lr`` and its schedule starts at
    ``ca_lr / 10``: with the switch, the first AdamW step (which moves each weight by its rate, for a
    non-zero gradient and no weight decay) is ten times the scheduled one."""
    from promptcl.core.alignment import ClassGaussians, align_head

    stats = ClassGaussians(2, 4, covariance="diag")
    stats.fit(torch.randn(20, 4, generator=torch.Generator().manual_seed(0)), torch.arange(20) % 2)
    moves = []
    for first_step_lr in (None, 1e-2):
        torch.manual_seed(0)
        head = torch.nn.Linear(4, 2)
        before = head.weight.detach().clone()
        align_head(head, stats, seen=range(0, 2), iterations=1, epochs=1, samples_per_class=8, lr=1e-3,
                   min_lr=1e-6, weight_decay=0.0, generator=torch.Generator().manual_seed(1),
                   first_step_lr=first_step_lr)
        moves.append((head.weight.detach() - before).abs().max().item())
    assert moves == pytest.approx([1e-3, 1e-2], rel=1e-4)
    # every step's rate: the first at the group's rate, then the cosine from its start, one step late
    rates = []
    step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: (
        rates.append(self.param_groups[0]["lr"]), step(self, *a, **k))[1])
    align_head(torch.nn.Linear(4, 2), stats, seen=range(0, 2), iterations=2, epochs=3, samples_per_class=4,
               lr=1e-3, min_lr=1e-6, weight_decay=0.0, generator=torch.Generator().manual_seed(1), first_step_lr=1e-2)
    assert rates == pytest.approx(reference_iter_schedule(1e-3, 1e-6, iter_step=2, epochs=3, hold=0, updates=6,
                                                          first=1e-2), rel=1e-9, abs=0)
    with pytest.raises(ValueError, match="per-iteration cosine only"):
        align_head(torch.nn.Linear(4, 2), stats, seen=range(0, 2), iterations=2, epochs=1, samples_per_class=4,
                   lr=1e-3, min_lr=1e-6, weight_decay=0.0, generator=torch.Generator().manual_seed(1),
                   first_step_lr=1e-2, cosine_per="epoch")
    m = make("vqprompt", compat_first_step_at_base_lr=True)
    calls = []
    monkeypatch.setattr("promptcl.methods.recipes.align_head", lambda *a, **k: calls.append(k))
    m.config.align(m.head, m.class_stats, TaskInfo(1, range(2, 4), T), lambda name: None)
    assert calls[0]["first_step_lr"] == pytest.approx(10 * m.config.ca_lr) and calls[0]["lr"] == m.config.ca_lr


class _ListLoader(list):
    """A list of batches with the sampler interface train_phase reads (steps per epoch)."""

    class _Sampler:
        def __init__(self, n):
            self.n = n

        def global_steps(self):
            return self.n

    @property
    def batch_sampler(self):
        return self._Sampler(len(self))


# --- VQ-Prompt ------------------------------------------------------------------------------
def test_vqprompt_forward_uses_the_quantised_prompt_and_backward_reaches_the_continuous_one():
    m = make("vqprompt")
    query = encode(m.backbone, torch.randn(3, 1, 8, 8))
    used, codebook = m.quantised_prompts(query)
    for layer, prefix in enumerate(used):
        for b in range(3):  # forward: one pool entry (to float rounding: p + (Q - p))
            assert sum(torch.allclose(prefix[b].detach(), entry, atol=1e-6, rtol=0)
                       for entry in m.pool[layer].detach()) == 1
    (sum(u.sum() for u in used)).backward()
    # backward: through the softmax weights to every key, and to every pool entry (the continuous mix)
    assert (m.keys.grad.abs().sum(-1) > 0).all()
    assert (m.pool.grad.flatten(2).abs().sum(-1) > 0).all()
    assert codebook.item() > 0


def test_vqprompt_quantisation_of_near_ties_does_not_depend_on_the_batch():
    """Mixes near the midpoint of two pool entries far from the origin (prompts have a common
    offset): each gets its float64-nearest entry, in a batch of 40 as alone."""
    from promptcl.methods.vqprompt import quantise

    g = torch.Generator().manual_seed(0)
    pool = 100 * torch.randn(64, generator=g, dtype=torch.float64) + 0.1 * torch.randn(10, 64, generator=g,
                                                                                      dtype=torch.float64)
    t = 0.5 + 1e-3 * torch.randn(40, 1, generator=g, dtype=torch.float64)
    mixes = pool[0] + t * (pool[1] - pool[0]) + 1e-4 * torch.randn(40, 64, generator=g, dtype=torch.float64)
    truth = pool[torch.cdist(mixes, pool).argmin(1)].float()
    mixes, pool = mixes.float(), pool.float()
    assert torch.equal(quantise(mixes, pool), truth)
    assert torch.equal(torch.cat([quantise(m[None], pool) for m in mixes]), truth)


def test_vqprompt_codebook_loss_by_hand_with_a_temperature():
    """alpha = softmax(q . normalize(K) / tau), p = sum alpha P, Q its nearest pool entry: the
    codebook loss is (codebook_weight + commitment_weight) x mse(p, Q), summed over the layers."""
    m = make("vqprompt", temperature=5.0)
    query = encode(m.backbone, torch.randn(3, 1, 8, 8))
    _, codebook = m.quantised_prompts(query)
    expected = 0.0
    with torch.no_grad():
        for layer in range(len(m.config.prompt_layers)):
            pool = m.pool[layer].flatten(1)
            alpha = (query @ F.normalize(m.keys[layer], dim=-1).T / 5.0).softmax(-1)
            mix = alpha @ pool
            nearest = ((mix[:, None] - pool[None]) ** 2).sum(-1).argmin(1)
            expected += (0.4 + 0.1) * ((mix - pool[nearest]) ** 2).mean()
    torch.testing.assert_close(codebook.detach(), expected, atol=1e-6, rtol=1e-5)


def test_vqprompt_codebook_weight_moves_the_continuous_prompt_commitment_weight_the_chosen_entry():
    """The code's vq_loss (codebook_weight) pulls p to sg(Q): its gradient reaches the keys through
    alpha; commit_loss (commitment_weight) pulls Q to sg(p): only the chosen pool entries move."""
    query = encode(build_backbone("vit_digits", pretrained=True), torch.randn(3, 1, 8, 8))
    commit = make("vqprompt", codebook_weight=0.0, commitment_weight=0.1)
    commit.quantised_prompts(query)[1].backward()
    assert commit.keys.grad is None or not commit.keys.grad.any()
    moved = commit.pool.grad.flatten(2).abs().sum(-1) > 0  # [layer, pool entry]
    assert 1 <= moved.sum(1).min() and moved.sum(1).max() <= 3  # at most one chosen entry per sample
    vq = make("vqprompt", codebook_weight=0.4, commitment_weight=0.0)
    vq.quantised_prompts(query)[1].backward()
    assert (vq.keys.grad.abs().sum(-1) > 0).all()
    assert (vq.pool.grad.flatten(2).abs().sum(-1) > 0).all()  # every entry, through the mix


# --- SimpleCIL, finetune, joint -------------------------------------------------------------
def test_simplecil_is_the_nearest_class_mean_by_cosine():
    m = make("simplecil")
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(30, 1, 8, 8, generator=g), torch.arange(30) % 2 + 2 * t) for t in range(2)]
    for t in range(2):
        task = TaskInfo(t, range(2 * t, 2 * t + 2), T)
        m.begin_task(task)
        m.end_task(task, lambda t=t: [data[t]], lambda name: None)
    feats = {c: encode(m.backbone, x[y == c]) for x, y in data for c in y.unique().tolist()}
    means = torch.stack([feats[c].double().mean(0) for c in range(4)]).float()
    test = torch.randn(16, 1, 8, 8, generator=g)
    q = encode(m.backbone, test)
    expected = (F.normalize(q, dim=1) @ F.normalize(means, dim=1).T).argmax(1)
    assert torch.equal(m.predict(test), expected)
    assert sum(p.numel() for p in m.trainable_parameters()) == 0


def test_joint_trains_each_task_afresh_on_all_seen_classes():
    scenario = ClassIncremental(load_dataset("digits"), increments=2, seed=0)
    labels = {int(y) for _, y in scenario.train_dataset(2, cumulative=True)}
    assert labels == set(range(6))
    assert len(scenario.train_dataset(2, cumulative=True)) == sum(len(scenario.train_dataset(t)) for t in range(3))
    m = make("joint")
    start = [p.detach().clone() for p in m.trainable_parameters()]
    with torch.no_grad():
        for p in m.trainable_parameters():
            p.add_(1.0)
    m.begin_task(TaskInfo(1, range(2, 4), T))  # back to the seeded initial state
    assert all(torch.equal(a, b) for a, b in zip(start, m.trainable_parameters()))


# --- parameter counts -----------------------------------------------------------------------
# Trainable parameters on ViT-B/16 with a 100-class head (76,900) and 10 tasks, from the shapes
# of the papers' / official code's settings.
PAPER_COUNTS = {
    ("l2p", "paper"): 10 * 5 * 768 + 10 * 768 + 76_900,  # 122,980 (pool, keys, head)
    ("l2p", "l2p++"): 30 * 20 * 768 + 30 * 768 + 76_900,  # CODA's L2P++: 560,740
    ("l2p", "deep-l2p++"): 5 * (30 * 20 * 768 + 30 * 768) + 76_900,  # a pool and keys per block: 2,496,100
    ("dualprompt", "paper"): 2 * 2 * 5 * 768 + 10 * 3 * 2 * 5 * 768 + 10 * 768 + 76_900,  # 330,340
    # CODA's: tensor_prompt(6, 768) per G block, (10, 20, 768) prompts and (10, 768) keys per E block
    ("dualprompt", "coda-cifar100"): 2 * 6 * 768 + 3 * (10 * 20 * 768 + 10 * 768) + 76_900,  # 569,956
    ("coda", "paper"): 3_916_900,  # 5 x (100 x 8 x 768 + 2 x 100 x 768) + head
    ("ovor", "paper"): 2 * 10 * 768 + 3 * 40 * 768 + 76_900,  # 184,420
    ("vqprompt", "paper"): 345_600 + 76_900,  # the SMoPE poster's 0.3456 M + head
    ("simplecil", "paper"): 0,
    # NoRGa's baseline configs: L2P pool 30 x 5 tokens; DualPrompt E-prompts of 20 key + 20 value tokens;
    # S-Prompt++ the same E-prompts in blocks 0-4 and no G-prompt
    ("l2p", "norga-cifar100"): 30 * 5 * 768 + 30 * 768 + 76_900,  # 215,140
    ("dualprompt", "norga-cifar100"): 2 * 2 * 5 * 768 + 10 * 3 * 2 * 20 * 768 + 10 * 768 + 76_900,  # 1,021,540
    ("sprompt++", "paper"): 10 * 5 * 2 * 20 * 768 + 10 * 768 + 76_900,  # 1,620,580
}


@pytest.mark.parametrize("name,preset", sorted(PAPER_COUNTS))
def test_paper_parameter_counts_on_vit_base(name, preset):
    cls = get_method(name)
    with torch.device("meta"):
        m = cls(cls.PRESETS[preset], backbone=build_backbone("vit_base_patch16_224"), num_classes=100, num_tasks=10)
    assert sum(p.numel() for p in m.trainable_parameters()) == PAPER_COUNTS[(name, preset)]


def test_query_methods_cost_two_passes_and_one_prompt_methods_one(capsys):
    costs = {}
    for name in ("l2p", "coda", "ovor", "simplecil"):
        assert main(["cost", "--method", name, "--backbone", "vit_digits", "--num-classes", "10",
                     "--dataset", "digits", "--json"]) == 0
        costs[name] = json.loads(capsys.readouterr().out)
    for name, passes in (("l2p", 2), ("coda", 2), ("ovor", 1), ("simplecil", 1)):
        ratio = costs[name]["test_flops_per_image"] / costs[name]["backbone_flops_per_image"]
        assert passes <= ratio < passes + 0.6, (name, ratio)
        assert costs[name]["test_passes"] == passes


@pytest.mark.parametrize("name,setting,message", [
    ("l2p", "top_k=11", "top_k=11 must be between 1 and pool_size=10"),
    ("coda", "pool_size=7", "pool_size 7 must be a multiple of the 5 tasks"),
    ("ovor", "id_threshold=0", "id_threshold 0.0 must be below ood_threshold -3.0"),
    ("vqprompt", "temperature=0", "temperature must be > 0, got 0.0"),
    ("dualprompt", "e_layers=", "e_layers must be distinct non-negative block indices, got ()"),
    ("l2p", "token_layout=sideways", "invalid value 'sideways' for token_layout"),
    ("sprompt++", "e_layers=0,0", "e_layers must be distinct non-negative block indices, got (0, 0)"),
    ("smope", "prompt_layers=-1,0", "prompt_layers must be distinct non-negative block indices, got (-1, 0)"),
    ("dualprompt", "schedule=weekly", "invalid value 'weekly' for schedule"),
    ("dualprompt", "head_init=xavier", "invalid value 'xavier' for head_init"),
])
def test_bad_settings_fail_before_any_work(name, setting, message, capsys, tmp_path):
    out = tmp_path / "run"
    assert main(["run", "--method", name, "--dataset", "digits", "--out", str(out), "--set", setting]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert list(tmp_path.iterdir()) == []


# --- every method end to end ----------------------------------------------------------------
@pytest.mark.parametrize("name", NEW_METHODS)
def test_every_method_runs_a_sequence(name, tmp_path):
    summary = run_sequence(resolve_run(RunSpec(method=name, dataset="digits")), tmp_path)
    assert np.isfinite(summary["final_average_accuracy"]) and summary["final_average_accuracy"] > 20
    assert ("task_identity_accuracy" in summary) == get_method(name).INFERS_TASK  # what studies may optimise
    assert (tmp_path / "summary.json").is_file()


def test_finetune_forgets_and_joint_does_not(tmp_path):
    finetune = run_sequence(resolve_run(RunSpec(method="finetune", dataset="digits")), tmp_path / "f")
    joint = run_sequence(resolve_run(RunSpec(method="joint", dataset="digits")), tmp_path / "j")
    assert finetune["forgetting"] >= 30
    assert joint["final_average_accuracy"] > finetune["final_average_accuracy"] + 30


def test_a_query_method_through_the_command_line(tmp_path, capsys):
    assert main(["run", "--method", "dualprompt", "--dataset", "digits", "--out", str(tmp_path / "run"),
                 "--set", "epochs=2"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0 <= summary["task_identity_accuracy"] <= 100 and summary["test_passes"] == 2
    assert main(["cost", "--method", "dualprompt", "--backbone", "vit_base_patch16_224", "--num-classes", "100",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["trainable_params"] == 330_340


def test_summaries_carry_what_a_report_shows_expert_usage_and_gate_scalars(tmp_path):
    smope = run_sequence(resolve_run(RunSpec(method="smope", dataset="digits", overrides={"epochs": 1,
                                                                                          "ca_epochs": 1})), tmp_path / "s")
    usage = np.array(smope["method_state"]["expert_usage"])
    assert usage.shape == (3, 4, 8)  # digits preset: 3 prompted layers, 4 heads, 8 experts
    # clean top-2 routing of every training image of every task (SMoPE routes per sample), per layer and head
    train_images = sum(len(ClassIncremental(load_dataset("digits"), increments=2, seed=0).train_dataset(t))
                       for t in range(5))
    assert np.all(usage.sum(-1) == 2 * train_images)
    norga = run_sequence(resolve_run(RunSpec(method="norga", dataset="digits", overrides={
        "epochs": 1, "tii_epochs": 1, "tii_ca_epochs": 1, "tap_epochs": 1})), tmp_path / "n")
    state = norga["method_state"]
    assert len(state["alpha"]) == len(state["tau"]) == 3 and state["gate_activation"] == "tanh"
    assert state["alpha"] != [1.0, 1.0, 1.0]  # learned on the first task
    assert json.loads((tmp_path / "n" / "summary.json").read_text())["method_state"] == state


@pytest.mark.parametrize("compat", [False, True])
def test_sprompt_clusters_augmented_images_only_with_the_compat_switch(compat, tmp_path):
    """K-means reads the augmented images only with the compat switch, and then stores none of them."""
    m = make("sprompt", centroids_per_task=2, compat_augmented_statistics=compat)
    m.training_augmented = True
    m.feature_store = FeatureStore(tmp_path, fingerprint={"test": 1})
    g = torch.Generator().manual_seed(0)
    plain, augmented_images = torch.randn(12, 1, 8, 8, generator=g), torch.randn(12, 1, 8, 8, generator=g)
    requested = []

    def train_batches(augmented=False):
        requested.append(augmented)
        return [(augmented_images if augmented else plain, torch.arange(12) % 2)]

    task = TaskInfo(0, range(0, 2), T)
    m.begin_task(task)
    m.end_task(task, train_batches, lambda name: None)
    assert requested == [compat]
    assert len(m.feature_store) == (0 if compat else 12)
    clustered = F.normalize(encode(m.backbone, augmented_images if compat else plain), dim=1)
    torch.testing.assert_close(m.centroids[0], kmeans_centroids(clustered, 2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("compat", [False, True])
@pytest.mark.parametrize("name", ["smope", "vqprompt"])
def test_aligned_methods_statistics_read_augmented_images_only_with_the_compat_switch(name, compat, tmp_path):
    """Usage counts and class Gaussians come from the test-time pipeline unless
    ``compat_augmented_statistics`` asks for the reference's augmented training images, whose
    frozen features (VQ-Prompt's queries) never reach the feature store."""
    m = make(name, compat_augmented_statistics=compat)
    m.training_augmented = True
    m.feature_store = FeatureStore(tmp_path, fingerprint={"test": 1})
    g = torch.Generator().manual_seed(0)
    plain, augmented_images = torch.randn(12, 1, 8, 8, generator=g), torch.randn(12, 1, 8, 8, generator=g)
    labels = torch.arange(12) % 2
    requested = []

    def train_batches(augmented=False):
        requested.append(augmented)
        return [(augmented_images if augmented else plain, labels)]

    task = TaskInfo(0, range(0, 2), T)
    m.begin_task(task)
    m.end_task(task, train_batches, lambda name: None)
    assert requested == [compat]
    assert len(m.feature_store) == (0 if compat or name == "smope" else 12)  # SMoPE makes no frozen pass
    images = augmented_images if compat else plain
    if name == "smope":
        expected = encode(m.backbone, images, m.experts.prompts("sparse", noisy=False, routing=Routing()))
    else:
        expected = m.features(images)[0]
    torch.testing.assert_close(m.class_stats.mean[0], expected[labels == 0].mean(0), atol=1e-5, rtol=0)
