"""Parameter and FLOP accounting."""

import json

import pytest
import torch

from promptcl.core.backbone import LOCAL_BACKBONES, build_backbone, encode
from promptcl.cli import main
from promptcl.cost import count_flops, measure_cost, train_flops_per_run
from promptcl.methods import get_method, method_names
from promptcl.methods.base import TaskInfo


def analytic_vit_flops(img, patch, chans, dim, depth, heads, mlp_ratio):
    """2 x MACs of patch embedding, qkv, attention matmuls, projection and MLP."""
    n = (img // patch) ** 2 + 1
    hidden = int(dim * mlp_ratio)
    per_block = 2 * n * dim * 3 * dim + 2 * 2 * n * n * dim + 2 * n * dim * dim + 2 * 2 * n * dim * hidden
    return 2 * (n - 1) * dim * chans * patch * patch + depth * per_block


def test_backbone_flops_match_the_analytic_count_with_fused_and_plain_attention():
    cfg = LOCAL_BACKBONES["vit_digits"]
    expected = analytic_vit_flops(cfg["img_size"], cfg["patch_size"], cfg["in_chans"], cfg["embed_dim"],
                                  cfg["depth"], cfg["num_heads"], cfg["mlp_ratio"])
    vit = build_backbone("vit_digits", pretrained=False)
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        assert count_flops(lambda: encode(vit, x)) == expected  # CPU SDPA counted via our formula
        for block in vit.blocks:
            block.attn.fused_attn = False
        assert count_flops(lambda: encode(vit, x)) == expected


def test_smope_costs_on_the_digits_preset():
    smope = get_method("smope")
    config = smope.PRESETS["small"]
    cost = measure_cost(smope, config, "vit_digits", 10, (1, 8, 8))
    vit = build_backbone("vit_digits", pretrained=False)
    backbone_params = sum(p.numel() for p in vit.parameters())
    prompts = len(config.prompt_layers) * 4 * config.num_experts * 2 * 16
    assert cost["trainable_params"] == prompts + 64 * 10 + 10
    assert cost["total_params"] == backbone_params + cost["trainable_params"]
    # one pass: the backbone, plus the selected experts' attention columns, the routing and the head
    assert cost["backbone_flops_per_image"] < cost["test_flops_per_image"] < 1.05 * cost["backbone_flops_per_image"]
    assert cost["train_flops_per_image"] > 1.5 * cost["test_flops_per_image"]
    # per image, of the main (sparse) phase: one image's step counted here by hand
    assert set(cost["train_flops_per_image_by_phase"]) == {"dense_warmup", "sparse"}
    assert cost["train_flops_per_image"] == cost["train_flops_per_image_by_phase"]["sparse"]
    torch.manual_seed(0)
    method = smope(config, backbone=vit, num_classes=10, num_tasks=10)
    task = TaskInfo(index=0, classes=range(0, 10), num_tasks=1)
    method.begin_task(task)
    method.train()
    vit.eval()
    sparse = method.phases(task)[-1]
    image, label = torch.randn(1, 1, 8, 8), torch.zeros(1, dtype=torch.long)
    one_image = count_flops(lambda: method.training_loss(image, label, task, sparse)[0].backward())
    assert cost["train_flops_per_image"] == pytest.approx(one_image, rel=0.01)
    more = measure_cost(smope, config.__class__(**{**config.__dict__, "top_k": 6}), "vit_digits", 10, (1, 8, 8))
    assert more["test_flops_per_image"] > cost["test_flops_per_image"]


def test_cost_command_for_vit_base_with_json(capsys):
    assert main(["cost", "--method", "smope", "--backbone", "vit_base_patch16_224", "--num-classes", "100",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    # the paper's CIFAR-100 count: 6 layers x 12 heads x 25 experts x (64 + 64) + 768 x 100 + 100
    assert out["trainable_params"] == 230_400 + 76_900
    assert set(out) >= {"trainable_params", "total_params", "train_flops_per_image", "test_flops_per_image",
                        "backbone_flops_per_image"}
    # ViT-B/16 at 224 px: 35.13 GFLOPs analytic
    assert out["backbone_flops_per_image"] == analytic_vit_flops(224, 16, 3, 768, 12, 12, 4.0)
    assert out["test_flops_per_image"] / out["backbone_flops_per_image"] < 1.01


def test_cost_command_prints_every_figure_aligned_with_one_line_per_phase(capsys):
    assert main(["cost", "--method", "smope", "--backbone", "vit_digits", "--num-classes", "10", "--num-tasks", "5",
                 "--preset", "small"]) == 0
    lines = capsys.readouterr().out.splitlines()
    labels = [line.split(":")[0].strip() for line in lines]
    assert {"train_flops_per_image_by_phase[dense_warmup]", "train_flops_per_image_by_phase[sparse]"} <= set(labels)
    assert len({line.index(":") for line in lines}) == 1  # the colons line up


def test_cost_command_rejects_bad_input(capsys):
    assert main(["cost", "--method", "smope", "--backbone", "resnet50", "--num-classes", "10"]) == 2
    assert main(["cost", "--method", "smope", "--backbone", "vit_digits", "--num-classes", "10",
                 "--set", "top_k=99"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "not a timm VisionTransformer" in err[0] and "top_k=99" in err[1]
    base = ["cost", "--method", "smope", "--backbone", "vit_base_patch16_224", "--num-classes", "10"]
    for extra, message in ((["--img-size", "13"], "--img-size must be a positive multiple of vit_base_patch16_224's "
                                                  "patch size 16, got 13"),
                           (["--img-size", "-16"], "--img-size must be a positive multiple"),
                           (["--dataset", "nosuch"], "unknown dataset 'nosuch'"),
                           (["--num-tasks", "20"], "--num-tasks (20) must divide --num-classes (10)")):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_cost_at_another_image_size_counts_its_tokens(capsys):
    """ViT-B/16 at 384 px: 577 tokens, the backbone's FLOPs by the same analytic count."""
    assert main(["cost", "--method", "smope", "--backbone", "vit_base_patch16_224", "--num-classes", "100",
                 "--img-size", "384", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["backbone_flops_per_image"] == analytic_vit_flops(384, 16, 3, 768, 12, 12, 4.0)


def test_flops_count_the_method_not_the_fused_kernel_layout():
    """NoRGa's gated prefix runs through the fused path (queries padded with the prefix logits'
    coordinates), yet its counted test FLOPs equal HiDe's linear prefix of the same geometry: cost
    accounting counts the reference arithmetic, whichever path is active."""
    from promptcl.core.attention import prefix_attention_impl

    costs = {}
    for name in ("hide", "norga"):
        cls = get_method(name)
        with prefix_attention_impl("fused"):
            costs[name] = measure_cost(cls, cls.PRESETS["small"], "vit_digits", 10, (1, 8, 8), num_tasks=5)
    assert costs["norga"]["test_flops_per_image"] == costs["hide"]["test_flops_per_image"]
    assert costs["norga"]["test_flops_per_image"] > 2 * costs["norga"]["backbone_flops_per_image"]


def test_train_flops_per_run_by_hand():
    cost = {"train_flops_per_image_by_phase": {"warmup": 7, "main": 5}, "backbone_flops_per_image": 3,
            "prompted_pass_flops_per_image": 4}
    work = {"phase_images": {"warmup": 10, "main": 100}, "frozen_pass_images": 20, "prompted_pass_images": 30}
    assert train_flops_per_run(cost, work) == 10 * 7 + 100 * 5 + 20 * 3 + 30 * 4


def test_every_phase_a_method_trains_is_costed():
    """train_flops_per_run prices each phase by its own step: every phase name of tasks 0-2 has one."""
    for name in method_names():
        cls = get_method(name)
        config = cls.PRESETS["small"]
        cost = measure_cost(cls, config, "vit_digits", 10, (1, 8, 8), num_tasks=5)
        method = cls(config, backbone=build_backbone("vit_digits", pretrained=False), num_classes=10, num_tasks=5)
        for t in range(3):
            task = TaskInfo(t, range(2 * t, 2 * t + 2), 5)
            method.begin_task(task)
            assert {p.name for p in method.phases(task)} <= set(cost["train_flops_per_image_by_phase"]), name
        # one prompted pass, never a frozen one more (a wrong TEST_PASSES would count two passes, or none)
        backbone = cost["backbone_flops_per_image"]
        assert backbone <= cost["prompted_pass_flops_per_image"] < 1.5 * backbone, name


@pytest.mark.parametrize("name", ["hide", "norga"])
def test_prompted_pass_cost_is_one_counted_prompted_pass(name):
    """The end-of-task statistics pass of HiDe/NoRGa, counted on its own: the costed figure (the test
    forward less its frozen pass) adds only the head and the task-identity MLP, under 1 %."""
    from promptcl.core.attention import prefix_attention_impl

    cls = get_method(name)
    cost = measure_cost(cls, cls.PRESETS["small"], "vit_digits", 10, (1, 8, 8), num_tasks=5)
    method = cls(cls.PRESETS["small"], backbone=build_backbone("vit_digits", pretrained=False), num_classes=10,
                 num_tasks=5)
    method.begin_task(TaskInfo(0, range(0, 10), 1))
    method.eval()
    with torch.no_grad(), prefix_attention_impl("eager"):
        counted = count_flops(lambda: method.features(torch.randn(1, 1, 8, 8), torch.zeros(1, dtype=torch.long)))
    assert counted > cost["backbone_flops_per_image"]  # the prompts add work
    assert counted <= cost["prompted_pass_flops_per_image"] <= 1.01 * counted
