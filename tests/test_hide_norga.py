"""HiDe-Prompt and NoRGa: prompt gather (correct and reference-compatible), gate, TII/TAP
mechanics, batch invariance, presets, costs."""

import dataclasses
import json
import tempfile
from pathlib import Path

import pytest
import torch

from promptcl.core.backbone import build_backbone
from promptcl.cli import main
from promptcl.engine import RunSpec, resolve_run
from promptcl.methods import get_method
from promptcl.methods.base import TaskInfo
from promptcl.methods.hide import HiDeConfig
from promptcl.core.alignment import ClassCentroids, ClassGaussians, align_head
from promptcl.core.tii import ResidualMLP, TaskIdentifier

T = 5


def make(name="hide", **overrides):
    torch.manual_seed(0)
    cls = get_method(name)
    config = cls.PRESETS["small"].__class__(**{**cls.PRESETS["small"].__dict__, **overrides})
    method = cls(config, backbone=build_backbone("vit_digits", pretrained=False), num_classes=10, num_tasks=T)
    return method.eval()


def see_all_tasks(method):
    for t in range(T):
        method.begin_task(TaskInfo(t, range(2 * t, 2 * t + 2), T))
    with torch.no_grad():  # distinct prompts per task, so a wrong gather shows
        method.prompts.uniform_(-1, 1)
    return method


def prefixes(method, ids):
    """(keys, values) each sample gets in the first prompted layer, [B, H, length, d]."""
    prompt = method.layer_prompts(method.gathered_prompts(ids))[0]
    prefix = prompt(None)
    return prefix.keys, prefix.values


def test_default_gather_gives_each_sample_its_own_task_prompt():
    m = see_all_tasks(make())
    ids = torch.tensor([3, 0, 4, 1])
    keys, values = prefixes(m, ids)
    for b, t in enumerate(ids.tolist()):
        assert torch.equal(keys[b], m.prompts[0, 0, t].transpose(0, 1))
        assert torch.equal(values[b], m.prompts[0, 1, t].transpose(0, 1))


def test_compat_gather_matches_a_hand_built_reference_gather():
    """Reference: [L, 2, B, ...] reshaped (not permuted) to [L, B, 2, ...]; flattening (kv, sample)
    row-major, sample b takes item 2b as its key and item 2b + 1 as its value."""
    m = see_all_tasks(make(compat_reference_gather=True))
    ids = torch.tensor([3, 0, 4, 1])
    B = len(ids)
    keys, values = prefixes(m, ids)
    item = lambda j: m.prompts[0, j // B, ids[j % B]].transpose(0, 1)  # noqa: E731
    for b in range(B):
        assert torch.equal(keys[b], item(2 * b))
        assert torch.equal(values[b], item(2 * b + 1))
    # with a single sample the reference pairing is the correct one
    one = torch.tensor([2])
    assert all(torch.equal(a, b) for a, b in zip(prefixes(m, one), prefixes(see_all_tasks(make()), one)))


def test_predictions_do_not_depend_on_the_batch_but_compat_ones_do():
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(9))  # fixed: one the untrained TII splits
    m = see_all_tasks(make())
    batch, details = m.predict_with_details(x)
    assert len(set(details["task"].tolist())) > 1  # a mixed batch (untrained TII)
    single = torch.cat([m.predict(x[i:i + 1]) for i in range(16)])
    assert torch.equal(batch, single)
    with torch.no_grad():
        feats = m.features(x, details["task"])
        feats_single = torch.cat([m.features(x[i:i + 1], details["task"][i:i + 1]) for i in range(16)])
    torch.testing.assert_close(feats, feats_single, atol=1e-5, rtol=0)

    compat = see_all_tasks(make(compat_reference_gather=True))
    with torch.no_grad():
        mixed = compat.features(x, details["task"])
    assert not torch.allclose(mixed, feats, atol=1e-3)


def test_compat_batchwise_prompt_takes_the_majority_task():
    m = see_all_tasks(make(compat_reference_gather=True, batchwise_prompt=True))
    x = torch.randn(16, 1, 8, 8)
    votes = m.infer_tasks(x)
    _, details = m.predict_with_details(x)
    assert details["task"].unique().tolist() == [int(torch.bincount(votes).argmax())]
    # without the compat switch the batchwise setting has no effect
    plain = see_all_tasks(make(batchwise_prompt=True))
    assert torch.equal(plain.predict_with_details(x)[1]["task"], plain.infer_tasks(x))


def test_new_prompt_starts_from_the_previous_one_and_momentum_follows_the_formula():
    m = make(prompt_momentum=0.25)
    m.begin_task(TaskInfo(0, range(0, 2), T))
    with torch.no_grad():
        m.prompts[:, :, 0] += 1.0
    m.begin_task(TaskInfo(1, range(2, 4), T))
    assert torch.equal(m.prompts[:, :, 1], m.prompts[:, :, 0])
    with torch.no_grad():
        m.prompts[:, :, 1] *= 3.0
    m.begin_task(TaskInfo(2, range(4, 6), T))
    used = m.gathered_prompts(torch.tensor([2, 2]), momentum_task=2)[:, :, 0]
    expected = 0.75 * m.prompts[:, :, 2] + 0.25 * m.prompts[:, :, :2].mean(2)
    torch.testing.assert_close(used, expected)


def test_norga_gate_is_applied_and_learnable_on_the_first_task_only():
    m = see_all_tasks(make("norga"))
    assert len(m.gates) == 3 and all(g.activation == "tanh" for g in m.gates)
    assert not any(p.requires_grad for p in m.gates.parameters())  # frozen from task 2 on
    fresh = make("norga")
    fresh.begin_task(TaskInfo(0, range(0, 2), T))
    groups = fresh.phases(TaskInfo(0, range(0, 2), T))[0].param_groups
    assert sum(p.numel() for p in groups[0]["params"]) == fresh.prompts.numel() + 6
    fresh.begin_task(TaskInfo(1, range(2, 4), T))
    assert sum(p.numel() for p in fresh.phases(TaskInfo(1, range(2, 4), T))[0].param_groups[0]["params"]) \
        == fresh.prompts.numel()
    keep = make("norga", gate_learnable_after_first_task=True)
    see_all_tasks(keep)
    assert all(p.requires_grad for p in keep.gates.parameters())
    # the gate changes the prompted features
    x, ids = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    hide = see_all_tasks(make())
    with torch.no_grad():
        m.prompts.copy_(hide.prompts)
        assert not torch.allclose(m.features(x, ids), hide.features(x, ids), atol=1e-4)


def test_contrastive_loss_by_hand():
    m = make()
    m.class_stats.mean[0] = torch.ones(64)
    feats = torch.zeros(2, 64)
    feats[0, 0] = 1.0
    rows = torch.stack([torch.ones(64), feats[0], feats[1]])
    sims = rows @ rows.T / 0.8
    expected = torch.nn.functional.cross_entropy(sims, torch.arange(3))
    torch.testing.assert_close(m.contrastive_loss(feats, old_classes=1), expected)


def test_contrastive_loss_per_group_is_the_mean_of_each_groups_term():
    """contrastive_group = a GPU's share of the batch: the mean of the terms of the groups, each
    against the same stored means, as data-parallel training averages the per-GPU terms' gradients
    (the last group is short where the batch does not divide)."""
    m = make(contrastive_group=2)
    m.class_stats.mean[0] = torch.ones(64)
    feats = 0.15 * torch.randn(5, 64, generator=torch.Generator().manual_seed(0))  # terms well above 0

    def term(group):
        rows = torch.cat([torch.ones(1, 64), group])
        return torch.nn.functional.cross_entropy(rows @ rows.T / 0.8, torch.arange(len(rows)))

    expected = (term(feats[:2]) + term(feats[2:4]) + term(feats[4:])) / 3
    torch.testing.assert_close(m.contrastive_loss(feats, old_classes=1), expected)
    assert not torch.allclose(expected, term(feats))  # grouping changes the term
    whole = make().contrastive_loss(feats, old_classes=0)
    torch.testing.assert_close(make(contrastive_group=5).contrastive_loss(feats, old_classes=0), whole)
    with pytest.raises(ValueError, match="contrastive_group must be >= 0"):
        HiDeConfig(contrastive_group=-1)


def test_contrastive_loss_reads_every_cluster_mean_with_multi_centroid_statistics():
    """HiDe's multi-centroid runs put every stored cluster mean of the old classes into the
    contrastive rows (the reference's orth_loss extends its rows by each class's list of means)."""
    m = make(statistics="multi-centroid", n_centroids=3)
    assert isinstance(m.class_stats, ClassCentroids) and isinstance(m.tii.stats, ClassCentroids)
    m.class_stats.mean[0, 0], m.class_stats.mean[0, 1] = torch.ones(64), -torch.ones(64)
    m.class_stats.mean[1, 0] = torch.full((64,), 2.0)  # a later class: not an old one
    m.class_stats.present[0, :2] = True
    m.class_stats.present[1, 0] = True
    feats = torch.zeros(2, 64)
    feats[0, 0] = 1.0
    rows = torch.stack([torch.ones(64), -torch.ones(64), feats[0], feats[1]])
    expected = torch.nn.functional.cross_entropy(rows @ rows.T / 0.8, torch.arange(4))
    torch.testing.assert_close(m.contrastive_loss(feats, old_classes=1), expected)


def _clustered(seed=0):
    """Class 0: three tight clusters of 20; class 1: two of 20 and one far single point."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0, 0, 0, 0], [10, 0, 0, 0], [0, 10, 0, 0], [0, 0, 10, 0], [0, 0, 0, 10]])
    parts = [centres[i] + 0.5 * torch.randn(20, 4, generator=g) for i in range(5)]
    single = torch.tensor([[-30.0, -30, -30, -30]])
    features = torch.cat([*parts, single])
    labels = torch.tensor([0] * 60 + [1] * 41)
    return features, labels, parts, single


def test_multi_centroid_statistics_are_kmeans_clusters_with_diagonal_gaussians():
    features, labels, parts, single = _clustered()
    torch.manual_seed(0)
    stats = ClassCentroids(3, 4, centroids=3)
    stats.fit(features, labels)
    assert stats.fitted.tolist() == [True, True, False] and stats.present[:2].all()

    def by_first_coords(rows):
        return sorted(rows.tolist(), key=lambda r: (round(r[0]), round(r[1]), round(r[2])))

    # each class's clusters are its groups: mean and population variance (ddof 0) of each
    for c, groups in ((0, parts[:3]), (1, [*parts[3:], single])):
        want_means = by_first_coords(torch.stack([g.mean(0) for g in groups]))
        got = sorted(zip(stats.mean[c].tolist(), stats.var[c].tolist()), key=lambda mv: (
            round(mv[0][0]), round(mv[0][1]), round(mv[0][2])))
        torch.testing.assert_close(torch.tensor([m for m, _ in got]), torch.tensor(want_means), atol=1e-5, rtol=0)
        want_vars = [g.var(0, unbiased=False) for g in sorted(
            groups, key=lambda g: tuple(round(v) for v in g.mean(0).tolist()[:3]))]
        torch.testing.assert_close(torch.tensor([v for _, v in got]), torch.stack(want_vars), atol=1e-5, rtol=0)
    # replays: per_class draws from every cluster with spread; the single point is skipped
    feats, drawn = stats.sample(range(0, 2), 200, torch.Generator().manual_seed(1))
    assert drawn.tolist() == [0] * 600 + [1] * 400
    assert feats[drawn == 1].min() > -20  # nothing drawn around the single point
    for group in parts:  # 200 draws near each cluster mean, with its spread (+ eps)
        near = feats[(feats - group.mean(0)).norm(dim=1) < 4]
        assert len(near) == 200
        torch.testing.assert_close(near.mean(0), group.mean(0), atol=0.15, rtol=0)
    # the contrastive rows: every fitted cluster mean (single point included, as the reference)
    assert stats.means(range(0, 2)).shape == (6, 4) and stats.means(range(0, 1)).shape == (3, 4)
    with pytest.raises(RuntimeError, match="never fitted"):
        stats.sample(range(0, 3), 1, torch.Generator())


def test_multi_centroid_fit_is_deterministic_and_handles_fewer_points_than_centroids():
    features, labels, _, _ = _clustered()
    fits = []
    for _ in range(2):
        torch.manual_seed(3)
        stats = ClassCentroids(2, 4, centroids=4)
        stats.fit(features, labels)
        fits.append(stats.state_dict())
    assert all(torch.equal(fits[0][k], fits[1][k]) for k in fits[0])
    few = ClassCentroids(1, 4, centroids=5)
    few.fit(torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0], [0, 2.0, 0, 0]]), torch.tensor([0, 0, 0]))
    assert few.present[0].tolist() == [True, True, False, False, False]
    # one cluster has two identical points, the other one point: no spread anywhere, nothing to draw
    assert few.sample(range(0, 1), 4, torch.Generator())[0].shape == (0, 4)
    with pytest.raises(ValueError, match="centroids must be >= 1"):
        ClassCentroids(1, 4, centroids=0)


def test_statistics_option_selects_the_reference_storage_methods():
    full, diag, mixture = (make(statistics=s) for s in ("covariance", "variance", "multi-centroid"))
    assert isinstance(full.class_stats, ClassGaussians) and full.class_stats.covariance == "full"
    assert isinstance(diag.tii.stats, ClassGaussians) and diag.tii.stats.covariance == "diag"
    assert mixture.class_stats.mean.shape == (10, 10, 64)  # 10 centroids per class by default
    with pytest.raises(ValueError, match="'kmeans' for statistics .expected one of covariance, variance, multi-centr"):
        resolve_run(RunSpec(method="hide", dataset="digits", overrides={"statistics": "kmeans"}))
    with pytest.raises(ValueError, match="n_centroids must be >= 1"):
        resolve_run(RunSpec(method="hide", dataset="digits", overrides={"n_centroids": "0"}))


def test_multi_centroid_run_fits_both_stages_and_realigns():
    """A short digits run with HiDe's own statistics: stage A and stage B store cluster mixtures
    and the run still identifies tasks and classes (FA well above chance)."""
    with tempfile.TemporaryDirectory() as root:
        out = str(Path(root) / "run")
        assert main(["run", "--method", "hide", "--dataset", "digits", "--seed", "0", "--set", "epochs=2",
                     "--set", "statistics=multi-centroid", "--set", "n_centroids=3", "--out", out]) == 0
        summary = json.loads((Path(out) / "summary.json").read_text())
        state = torch.load(Path(out) / "checkpoints" / "task_04.pt", weights_only=False)["state"]
    assert summary["final_average_accuracy"] > 60
    present = [v for k, v in state.items() if k.endswith("stats.present")]
    assert len(present) == 2 and all(bool(p.any(-1).all()) for p in present)  # every class clustered


def test_residual_mlp_structures():
    two = ResidualMLP(768, (2,))
    assert sum(p.numel() for p in two.parameters()) == 768 * 1536 + 1536 + 1536 * 768 + 768 + 2 * 768
    four = ResidualMLP(768, (4, 4))
    assert [type(l).__name__ for l in four.mlp] == ["Linear", "GELU", "Linear", "LayerNorm", "Linear"]
    x = torch.randn(3, 768)
    assert four(x).shape == (3, 768)


def test_tii_learns_tasks_and_realigns_on_gaussian_replays():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    tii = TaskIdentifier(8, 4, (2,))
    centers = torch.eye(8)[:4] * 6
    feats = torch.cat([centers[c] + 0.3 * torch.randn(40, 8, generator=g) for c in range(4)])
    labels = torch.arange(4).repeat_interleave(40)
    for t in range(2):
        sel = (labels // 2) == t
        tii.fit_task(lambda: (feats[sel], labels[sel]), range(2 * t, 2 * t + 2), epochs=30, batch_size=16,
                     lr=1e-2, grad_clip=1.0, generator=g)
        tii.stats.fit(feats[sel], labels[sel])
    # trained task by task, the classifier is biased to the last task; realignment fixes it
    tii.realign(seen=range(0, 4), iterations=2, epochs=30, samples_per_class=32, lr=0.05, generator=g)
    with torch.no_grad():
        assert (tii(feats).argmax(1) == labels).float().mean() > 0.95
    assert torch.allclose(tii.stats.cov[0], tii.stats.cov[0].T) and tii.stats.cov.shape == (4, 8, 8)


@pytest.mark.parametrize("benchmark_augments,tii_augmented", [(True, True), (True, False), (False, True)])
def test_stage_a_trains_on_a_fresh_augmented_pass_per_epoch_as_the_reference(benchmark_augments, tii_augmented):
    """Stage A's MLP sees each epoch's augmented images through the frozen backbone (never stored);
    its class statistics and stage B's read the test-time pipeline. Without augmentation in the
    benchmark (or with tii_augmented off), the frozen features are computed once."""
    from promptcl.core.feature_store import FeatureStore

    m = make(tii_epochs=3, tii_augmented=tii_augmented)
    m.training_augmented = benchmark_augments
    m.begin_task(TaskInfo(0, range(0, 2), T))
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(8, 1, 8, 8, generator=g), torch.tensor([0, 1] * 4)
    calls, passes = [], []

    class Loader:  # like a DataLoader: every pass over it draws new augmentations
        def __init__(self, augmented):
            self.augmented = augmented

        def __iter__(self):
            passes.append(self.augmented)
            yield (images + 0.5 * torch.randn(images.shape, generator=g) if self.augmented else images), labels

    def train_batches(augmented=False):
        calls.append(augmented)
        return Loader(augmented)

    with tempfile.TemporaryDirectory() as root:
        m.feature_store = FeatureStore(Path(root), fingerprint={"test": 1})
        m.end_task(TaskInfo(0, range(0, 2), T), train_batches, lambda name: None)
        stored, in_memory = m.feature_store.computed, len(m.feature_store)
    fresh = benchmark_augments and tii_augmented
    # one augmented loader for the task, passed over once per epoch
    assert calls == ([False, True, False] if fresh else [False, False])
    assert passes == ([False, True, True, True, False] if fresh else [False, False])
    assert m.frozen_images_computed == (3 * 8 if fresh else 0)  # augmented passes bypass the store
    assert stored == in_memory == 8  # the un-augmented images, once
    # training work (train_flops_per_run) counts every frozen pass, stored or not, and stage B's prompted one
    assert m.end_of_task_pass_images == {"frozen": 8 + (3 * 8 if fresh else 0), "prompted": 8}


def test_presets_and_backbone_defaults(cifar100_files):
    norga = get_method("norga")
    assert norga.preset_for("cifar100", "vit_base_patch16_224.orig_in21k").gate_activation == "sigmoid"
    assert norga.preset_for("cifar100", "vit_base_patch16_224.dino").gate_activation == "tanh"
    assert norga.PRESETS["imagenet-r"].prompt_length == 20 and norga.PRESETS["imagenet-r"].epochs == 150
    assert (norga.PRESETS["paper"].tap_lr, norga.PRESETS["paper"].tap_epochs) == (0.05, 80)
    hide = get_method("hide")
    assert (hide.PRESETS["paper"].tap_lr, hide.PRESETS["paper"].tap_epochs) == (0.005, 30)
    assert hide.PRESETS["5datasets"].tii_structure == (4, 4)
    for method in ("hide", "norga"):  # the reference's Sup-21K: the original in21k weights, not AugReg
        assert resolve_run(RunSpec(method=method, dataset="cifar100", data_dir=cifar100_files[0])).backbone == "sup21k"
    run = resolve_run(RunSpec(method="norga", dataset="digits", preset="imagenet-r",
                              overrides={"epochs": "2", "prompt_layers": "0,1"}))
    assert run.config.prompt_length == 20 and run.config.epochs == 2
    with pytest.raises(ValueError, match="unknown preset"):
        resolve_run(RunSpec(method="norga", dataset="digits", preset="cifar1000"))
    with pytest.raises(ValueError, match="gate_activation"):
        resolve_run(RunSpec(method="norga", dataset="digits", overrides={"gate_activation": "relu"}))


# (dataset, backbone) -> the gate activation of NoRGa's script for it (norga.md 1.6), written out
# in full so a table edit that drifts from the scripts fails here.
SCRIPT_ACTIVATIONS = [
    ("cifar100", "sup21k", "sigmoid"), ("cifar100", "ibot21k", "tanh"), ("cifar100", "ibot1k", "tanh"),
    ("cifar100", "dino1k", "tanh"), ("cifar100", "mocov3_1k", "gelu"),
    ("imagenet_r", "sup21k", "sigmoid"), ("imagenet_r", "ibot21k", "tanh"), ("imagenet_r", "ibot1k", "sigmoid"),
    ("imagenet_r", "dino1k", "tanh"), ("imagenet_r", "mocov3_1k", "gelu"),
    ("cub200", "sup21k", "sigmoid"), ("cub200", "ibot21k", "tanh"),
    ("five_datasets", "sup21k", "tanh"), ("five_datasets", "ibot21k", "sigmoid"),
]


@pytest.mark.parametrize("dataset,backbone,activation", SCRIPT_ACTIVATIONS)
def test_norga_activation_follows_the_script_for_dataset_and_backbone(dataset, backbone, activation):
    norga = get_method("norga")
    assert norga.preset_for(dataset, backbone).gate_activation == activation
    timm_name = {"sup21k": "vit_base_patch16_224.orig_in21k", "dino1k": "vit_base_patch16_224.dino"}.get(backbone)
    if timm_name:  # the same backbone under its timm name
        assert norga.preset_for(dataset, timm_name).gate_activation == activation


def test_self_supervised_scripts_change_more_than_the_gate():
    """The iBOT/DINO/MoCo scripts train prompts 20 epochs with momentum 0.1 on CIFAR-100 (both
    methods), 50 constant epochs on ImageNet-R; NoRGa's also realign differently."""
    hide, norga = get_method("hide"), get_method("norga")
    assert (hide.preset_for("cifar100", "ibot21k").epochs, hide.preset_for("cifar100", "ibot21k").prompt_momentum) \
        == (20, 0.1)
    assert hide.preset_for("cifar100", "sup21k") == hide.PRESETS["paper"]
    ibot = norga.preset_for("cifar100", "ibot21k")
    assert (ibot.epochs, ibot.tii_ca_lr, ibot.tap_lr, ibot.tap_epochs) == (20, 0.025, 0.005, 80)
    imr = norga.preset_for("imagenet_r", "ibot1k")
    assert (imr.epochs, imr.schedule, imr.tap_epochs, imr.prompt_length) == (50, "constant", 80, 20)
    assert (norga.preset_for("cub200", "ibot21k").tii_lr, norga.preset_for("cub200", "sup21k").tii_lr) == (2.5e-4, 5e-3)
    assert norga.preset_for("cifar100", "vit_tiny_patch16_224").gate_activation == "sigmoid"  # no script: preset's


# HiDe-Prompt's own scripts (thu-ml/HiDe-Prompt training_scripts/train_*_vit.sh, configs/*_hideprompt_5e.py),
# written out: (per-GPU batch, GPUs, stage-B --lr, head at a tenth?, stage-A --lr) and what each sets.
UPSTREAM = {
    "upstream-cifar100": (24, 8, 0.03, True, 5e-4, dict(epochs=50, schedule="step", prompt_length=5, reg=0.1)),
    "upstream-imagenet-r": (24, 8, 0.03, True, 5e-4, dict(epochs=150, schedule="cosine", prompt_length=20, reg=0.5)),
    "upstream-cub200": (24, 8, 0.03, False, 1e-2, dict(epochs=50, schedule="step", prompt_length=20, reg=0.01)),
    "upstream-5datasets": (32, 4, 0.03, True, 1e-3, dict(epochs=20, schedule="constant", prompt_length=40, reg=0.1,
                                                          grad_clip=2.0, tii_structure=(4, 4), batchwise_prompt=True)),
}


@pytest.mark.parametrize("name", sorted(UPSTREAM))
def test_upstream_presets_follow_hide_prompts_own_scripts(name):
    """unscale_lr: every rate x per-GPU batch / 256 (stage A's realignment from 0.005, stage B's TAP
    unscaled at 0.005); replays are one GPU's draw (every rank is seeded alike, so all GPUs draw the
    same samples); multi-centroid statistics."""
    per_gpu, gpus, lr, tenth, tii_lr, settings = UPSTREAM[name]
    c = get_method("hide").PRESETS[name]
    scale = per_gpu / 256
    assert c.batch_size == per_gpu * gpus
    assert (c.lr, c.head_lr) == pytest.approx((lr * scale, lr * scale * (0.1 if tenth else 1.0)))
    assert (c.tii_lr, c.tii_ca_lr) == pytest.approx((tii_lr * scale, 0.005 * scale))
    assert (c.tap_lr, c.tap_epochs, c.tii_epochs, c.tii_ca_epochs) == (0.005, 30, 20, 30)
    assert (c.tap_samples_per_class, c.tii_ca_samples_per_class) == (5 * per_gpu, per_gpu)
    assert (c.statistics, c.n_centroids, c.prompt_momentum) == ("multi-centroid", 10, 0.01)
    assert c.contrastive_group == per_gpu  # each GPU's contrastive term is over its own share
    assert {k: getattr(c, k) for k in settings} == settings
    # the self-supervised scripts on top: as NoRGa's HiDe scripts, and CUB iBOT-21K's stage A at 0.0005
    dataset = {"upstream-cifar100": "cifar100", "upstream-imagenet-r": "imagenet_r", "upstream-cub200": "cub200",
               "upstream-5datasets": "five_datasets"}[name]
    ibot = get_method("hide").preset_for(dataset, "ibot21k", preset=name)
    expected = {"cifar100": dict(epochs=20, prompt_momentum=0.1), "imagenet_r": dict(epochs=50, schedule="constant"),
                "cub200": dict(tii_lr=pytest.approx(5e-4 * scale)), "five_datasets": {}}[dataset]
    assert {k: getattr(ibot, k) for k in expected} == expected
    assert get_method("hide").preset_for(dataset, "sup21k", preset=name) == c
    with pytest.raises(ValueError, match="unknown preset"):  # NoRGa has no HiDe-upstream scripts
        get_method("norga").preset_name(dataset, name)


def test_head_and_task_identity_mlp_start_as_the_reference_initialises_them():
    """Truncated normal (std 0.02, within +-2) weights and zero biases, not PyTorch's default init."""
    from promptcl.core.backbone import build_backbone

    torch.manual_seed(0)
    method = get_method("hide")(get_method("hide").PRESETS["small"], backbone=build_backbone("vit_digits"),
                                num_classes=10, num_tasks=5)
    linears = [m for m in [*method.head.modules(), *method.tii.modules()] if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 4  # the head; the task-identity MLP (two layers) and its head
    for layer in linears:
        assert torch.count_nonzero(layer.bias) == 0
        assert layer.weight.abs().max() <= 2.0 and abs(layer.weight.std().item() - 0.02) < 0.004


def test_two_pass_cost_on_vit_base(capsys):
    assert main(["cost", "--method", "hide", "--backbone", "vit_base_patch16_224", "--num-classes", "100",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    prompts = 5 * 2 * 10 * 5 * 768
    tii = 768 * 1536 + 1536 + 1536 * 768 + 768 + 2 * 768 + 76_900
    assert out["trainable_params"] == prompts + 76_900 + tii
    assert out["test_passes"] == 2
    assert 2.0 < out["test_flops_per_image"] / out["backbone_flops_per_image"] < 2.02


def test_compat_switch_is_tagged_as_an_unfair_protocol():
    fair = resolve_run(RunSpec(method="norga", dataset="digits"))
    assert fair.protocol_tags() == {}
    compat = resolve_run(RunSpec(method="norga", dataset="digits", overrides={"compat_reference_gather": "true"}))
    assert compat.protocol_tags() == {"compat/compat_reference_gather": "true", "unfair_protocol": "true"}
    # a batch-wide vote on the prompts makes a prediction depend on its batch too
    vote = resolve_run(RunSpec(method="l2p", dataset="digits", overrides={"batchwise_prompt": "true"}))
    assert vote.protocol_tags() == {"compat/batchwise_prompt": "true", "unfair_protocol": "true"}
    # HiDe's vote acts through the compat gather only (its 5-datasets presets set it): alone, no tag
    inert = resolve_run(RunSpec(method="hide", dataset="digits", overrides={"batchwise_prompt": "true"}))
    assert inert.protocol_tags() == {} and inert.batch_dependent_switches() == []
    both = resolve_run(RunSpec(method="hide", dataset="digits",
                               overrides={"batchwise_prompt": "true", "compat_reference_gather": "true"}))
    assert both.batch_dependent_switches() == ["compat_reference_gather", "batchwise_prompt"]
    assert both.protocol_tags()["compat/batchwise_prompt"] == "true"
    # a numeric switch is on when not 0, and tagged with its value
    schedule = resolve_run(RunSpec(method="smope", dataset="digits", overrides={"compat_schedule_iter_step": "40"}))
    assert schedule.protocol_tags() == {"compat/compat_schedule_iter_step": "40", "unfair_protocol": "true"}
    assert resolve_run(RunSpec(method="smope", dataset="digits")).protocol_tags() == {}
    # sharded over workers, each would mix or vote (or cross CODA's pull) within its shard only:
    # refused before any work
    from promptcl.study.trainer import Scaling

    crossed = resolve_run(RunSpec(method="l2p", dataset="digits", overrides={
        "form": "prefix", "prefix_layers": "0", "compat_batch_crossed_pull": "true"}))
    assert crossed.protocol_tags() == {"compat/compat_batch_crossed_pull": "true", "unfair_protocol": "true"}
    for run in (compat, vote, crossed):
        with pytest.raises(ValueError, match="run it on one worker"):
            Scaling(num_workers=2).check(run)
        Scaling(num_workers=1).check(run)
    Scaling(num_workers=2).check(dataclasses.replace(fair, config=dataclasses.replace(fair.config, reg=0.0)))


@pytest.mark.parametrize("method", ["hide", "norga"])
def test_workers_must_not_change_the_contrastive_groups(method):
    """Each worker computes the contrastive term over its own share of the batch (as HiDe-Prompt's
    scripts do per GPU): several workers run the one-process objective only when the term is per
    group of a size that divides a share (then each worker's groups are random groups of the batch
    of that size, as in one process); the whole-batch term (the default) is refused before any work."""
    from promptcl.study.trainer import Scaling

    def run(**overrides):
        overrides = {k: str(v) for k, v in overrides.items()}
        return resolve_run(RunSpec(method=method, dataset="digits", overrides=overrides))

    with pytest.raises(ValueError, match=r"^the contrastive term over the whole batch \(contrastive_group=0\) would "
                                         r"be over each of the 2 workers' shares of 16 images; set contrastive_group "
                                         r"to a divisor of 16"):
        Scaling(num_workers=2).check(run())
    with pytest.raises(ValueError, match=r"per group of contrastive_group=12 would be over each of the 2 workers"):
        Scaling(num_workers=2).check(run(contrastive_group=12))
    for fine in (run(contrastive_group=16), run(contrastive_group=8), run(reg=0.0)):
        Scaling(num_workers=2).check(fine)
    Scaling(num_workers=1).check(run())
    Scaling(num_workers=4).check(run(contrastive_group=8))


def test_compat_unmasked_test_logits_lets_unseen_classes_win():
    m = make(compat_unmasked_test_logits=True)
    m.begin_task(TaskInfo(0, range(0, 2), T))
    with torch.no_grad():
        m.head.bias[7] = 1e6  # an untrained, unseen class row
    x = torch.randn(4, 1, 8, 8)
    assert m.predict(x).tolist() == [7] * 4
    masked = make()
    masked.begin_task(TaskInfo(0, range(0, 2), T))
    with torch.no_grad():
        masked.head.bias[7] = 1e6
    assert set(masked.predict(x).tolist()) <= {0, 1}


def test_end_task_passes_take_the_run_autocast_and_return_fp32_features():
    """collect_features runs the backbone pass under the run's autocast (set by the engine) and
    hands fp32 features to the fits, which run outside it."""
    method = make("hide")
    method.pass_autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    seen = []

    def encode(images):
        seen.append(torch.is_autocast_cpu_enabled())
        return method.frozen_features(images).bfloat16()  # a pass whose last op ran in bf16

    batches = [(torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 1]))]
    feats, labels = method.collect_features(encode, batches, prompted=False)
    assert seen == [True] and not torch.is_autocast_cpu_enabled()
    assert feats.dtype == torch.float32 and feats.shape == (3, method.embed_dim) and labels.tolist() == [0, 1, 1]
    # training work: the frozen passes encode made; a prompted encode that also makes a query pass
    assert method.end_of_task_pass_images == {"frozen": 3, "prompted": 0}
    method.collect_features(lambda x: method.features(x, torch.zeros(len(x), dtype=torch.long))
                            + 0 * method.frozen_features(x), batches, prompted=True)
    assert method.end_of_task_pass_images == {"frozen": 6, "prompted": 3}


def test_a_bf16_run_keeps_the_fp32_run_task_identity_and_accuracy(tmp_path):
    """With its end_task (statistics, TII, TAP) under bf16 autocast, NoRGa on digits identified
    21 % of tasks (fp32: 86 %); the fits now run in fp32 and only the passes in bf16."""
    from promptcl.engine import run_sequence

    summaries = {p: run_sequence(resolve_run(RunSpec(method="norga", dataset="digits", precision=p, device="cpu")),
                                 tmp_path / p) for p in ("fp32", "bf16")}
    fp32, bf16 = summaries["fp32"], summaries["bf16"]
    assert fp32["task_identity_accuracy"] > 80
    assert abs(bf16["task_identity_accuracy"] - fp32["task_identity_accuracy"]) < 3
    assert abs(bf16["final_average_accuracy"] - fp32["final_average_accuracy"]) < 3


@pytest.mark.parametrize("name", ["hide", "norga"])
def test_mocov3_head_trains_its_norm_on_the_raw_cls_as_the_reference(name):
    """MoCo v3 as NoRGa's/HiDe-Prompt's code builds it: features (class statistics, the contrastive
    term, the task-identity MLP's input) are the raw [CLS]; the LayerNorm on it belongs to the head and
    trains with it, in the prompt phase and in TAP. Other backbones' heads stay a plain Linear."""
    torch.manual_seed(0)
    small = dict(embed_dim=32, depth=2, num_heads=2, img_size=32)
    backbone = build_backbone("mocov3_1k", **small)
    cls = get_method(name)
    config = cls.PRESETS["small"].__class__(**{**cls.PRESETS["small"].__dict__, "prompt_layers": (0, 1)})
    method = cls(config, backbone=backbone, num_classes=4, num_tasks=2).eval()
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        raw_cls = backbone.blocks(backbone._pos_embed(backbone.patch_embed(x)))[:, 0]
        torch.testing.assert_close(method.frozen_features(x), raw_cls, atol=1e-5, rtol=0)
    norm = method.head.norm
    assert isinstance(norm, torch.nn.LayerNorm) and set(method.checkpoint_state()) >= {"head.norm.weight",
                                                                                        "head.norm.bias"}
    # the task-identity MLP ends in the reference's fc_norm (eps 1e-6) in place of its own LayerNorm
    assert method.tii.mlp.norm.eps == 1e-6 and make(name).tii.mlp.norm.eps == 1e-5
    task = TaskInfo(0, range(0, 2), 2)
    method.begin_task(task)
    head_group = method.phases(task)[0].param_groups[1]["params"]
    assert any(p is norm.weight for p in head_group) and any(p is norm.weight for p in method.trainable_parameters())
    loss, _ = method.training_loss(x, torch.tensor([0, 1, 0, 1, 0, 1]), task, method.phases(task)[0])
    loss.backward()
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0
    # TAP (head alignment on Gaussian replays) moves the norm too
    method.class_stats.fit(torch.randn(40, 32) * 3, torch.arange(4).repeat_interleave(10))
    before = norm.weight.detach().clone()
    align_head(method.head, method.class_stats, seen=range(0, 4), iterations=2, epochs=2, samples_per_class=8,
               lr=0.1, min_lr=0.0, weight_decay=0.0, generator=torch.Generator().manual_seed(0), optimizer="sgd")
    assert not torch.equal(norm.weight, before)
    plain = make(name)
    assert isinstance(plain.head.norm, torch.nn.Identity)
    assert {k for k in plain.checkpoint_state() if k.startswith("head.")} == {"head.weight", "head.bias"}


def test_end_task_stores_the_trained_through_prompt_from_the_earlier_tasks_only():
    """With prompt momentum m, task t's stored prompt is (1 - m) P_t + m mean(P_0..P_{t-1}): the
    prompt its training passes went through (not an average that includes P_t itself)."""
    m = make(prompt_momentum=0.25, tii_epochs=1, tii_ca_epochs=0, tap_epochs=0)
    for t in range(2):
        m.begin_task(TaskInfo(t, range(2 * t, 2 * t + 2), T))
    with torch.no_grad():
        m.prompts.uniform_(-1, 1)
    before = m.prompts.detach().clone()
    x, labels = torch.randn(4, 1, 8, 8), torch.tensor([2, 3, 2, 3])
    m.end_task(TaskInfo(1, range(2, 4), T), lambda augmented=False: [(x, labels)], lambda name: None)
    torch.testing.assert_close(m.prompts[:, :, 1], 0.75 * before[:, :, 1] + 0.25 * before[:, :, 0])
    assert torch.equal(m.prompts[:, :, 0], before[:, :, 0])


def test_task_identity_trains_on_the_tasks_classes_and_infers_only_seen_ones():
    """Stage A's cross-entropy is masked to the task's own classes (other classes' rows get no
    gradient, so Adam leaves them), and inference picks among the seen classes only, however large
    an unseen class's row."""
    tii = TaskIdentifier(8, 10, (2,))
    before = [p.detach().clone() for p in (tii.head.weight, tii.head.bias)]
    tii.fit_task(lambda: (torch.randn(6, 8), torch.tensor([2, 3, 2, 3, 2, 3])), range(2, 4), epochs=1,
                 batch_size=6, lr=0.1, grad_clip=0.0, generator=torch.Generator().manual_seed(0))
    others = [c for c in range(10) if c not in (2, 3)]
    for p, old in zip((tii.head.weight, tii.head.bias), before):
        assert torch.equal(p[others], old[others]) and not torch.equal(p[2:4], old[2:4])

    m = make()
    for t in range(2):
        m.begin_task(TaskInfo(t, range(2 * t, 2 * t + 2), T))
    with torch.no_grad():
        m.tii.head.bias[9] = 1e4  # an unseen class's row
    assert set(m.infer_tasks(torch.randn(8, 1, 8, 8)).tolist()) <= {0, 1}  # an unseen class maps to -1


def test_the_contrastive_term_compares_with_earlier_tasks_class_means_only():
    """At task 1 the contrastive term reads the stored means of classes 0-1, not the current task's
    rows (not fitted until the end of the task; here copies of two batch features, which would make
    those features' rows ambiguous and the term large)."""
    m = make(reg=0.1)
    for t in range(2):
        m.begin_task(TaskInfo(t, range(2 * t, 2 * t + 2), T))
    task = TaskInfo(1, range(2, 4), T)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        feats = m.features(x, torch.ones(4, dtype=torch.long), momentum_task=1)
        m.class_stats.mean[:2] = torch.randn(2, 64)
        m.class_stats.mean[2:4] = feats[:2]
        expected = m.contrastive_loss(feats, old_classes=2)
        wrong = m.contrastive_loss(feats, old_classes=4)
    _, logs = m.training_loss(x, torch.tensor([2, 3, 2, 3]), task, m.phases(task)[0])
    assert logs["contrastive"] == pytest.approx(expected.item(), abs=1e-5)
    assert wrong.item() - expected.item() > 0.1


def test_class_variances_are_unbiased_or_on_request_the_populations():
    """Three features of one class: the unbiased variance divides the squared deviations by 2, the
    population one (SMoPE's and VQ-Prompt's np.var) by 3; each + the 1e-4 the references add."""
    feats = torch.tensor([[0.0, 1.0], [1.0, 1.0], [5.0, 1.0]])  # deviations from 2: -2, -1, 3 -> squares sum 14
    labels = torch.zeros(3, dtype=torch.long)
    for unbiased, expected in ((True, 14 / 2), (False, 14 / 3)):
        stats = ClassGaussians(1, 2, covariance="diag", unbiased=unbiased)
        stats.fit(feats, labels)
        torch.testing.assert_close(stats.cov[0], torch.tensor([expected + 1e-4, 1e-4]))
    vit = build_backbone("vit_digits", pretrained=True)
    for name in ("smope", "vqprompt"):
        cls = get_method(name)
        for switch in (False, True):
            config = dataclasses.replace(cls.PRESETS["small"], compat_population_variance=switch)
            assert cls(config, backbone=vit, num_classes=10, num_tasks=5).class_stats.unbiased is not switch


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_gaussian_replays_have_the_fitted_mean_and_covariance(covariance):
    """Replays drawn from a class's stored Gaussian have its mean and covariance: on correlated
    features (z·A + mu, covariance AᵀA) the full one reproduces the correlations, the diagonal one
    only the variances, its draws uncorrelated."""
    g = torch.Generator().manual_seed(0)
    a = torch.tensor([[2.0, 0.0, 0.0], [1.0, 0.5, 0.0], [0.0, 0.3, 1.0]])
    mu = torch.tensor([1.0, -3.0, 0.0])
    feats = torch.randn(20_000, 3, generator=g) @ a + mu
    stats = ClassGaussians(2, 3, covariance=covariance)
    stats.fit(feats, torch.ones(20_000, dtype=torch.long))
    draws, labels = stats.sample(range(1, 2), 20_000, g)
    assert labels.eq(1).all()
    torch.testing.assert_close(draws.mean(0), mu, atol=0.05, rtol=0)
    expected = a.T @ a if covariance == "full" else torch.diag(torch.diag(a.T @ a))
    torch.testing.assert_close(torch.cov(draws.T), expected, atol=0.15, rtol=0)
