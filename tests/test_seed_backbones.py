"""The seed papers' backbones: aliases, and each self-supervised release's checkpoint layout.

Release files are faked offline: a scaled-down ViT's state dict, nested and renamed as the release
nests it, with the release's extra entries (heads, projectors, momentum encoder, training args)."""

import argparse

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import promptcl.core.backbone as backbone_module
from promptcl.core.backbone import (
    SEED_BACKBONES,
    attention_geometry,
    backbone_family,
    build_backbone,
    check_backbone,
    check_backbone_name,
    classifier_norm_layer,
    encode,
    input_shape,
    load_backbone_checkpoint,
)

SMALL = dict(embed_dim=32, depth=2, num_heads=2, img_size=32)


def source_vit() -> torch.nn.Module:
    """A small ViT whose every weight (LayerNorms included) is away from its default init."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_base_patch16_224", num_classes=0, **SMALL).eval()
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return vit


def ibot_full_checkpoint(state):
    """iBOT's checkpoint.pth: student and teacher MultiCropWrappers, the optimizer, the args."""
    teacher = {f"backbone.{k}": v for k, v in state.items()}
    teacher.update({"backbone.masked_embed": torch.randn(32), "head.mlp.0.weight": torch.randn(64, 32),
                    "head.last_layer.weight_g": torch.randn(128, 1)})
    student = {f"module.{k}": v + 1 for k, v in teacher.items()}
    return {"teacher": teacher, "student": student, "optimizer": {"state": {}, "param_groups": []}, "epoch": 400,
            "args": argparse.Namespace(arch="vit_base", patch_size=16, lr=5e-4),
            "ibot_loss": {"center": torch.zeros(1, 8)}}


def ibot_teacher_checkpoint(state):
    """iBOT's checkpoint_teacher.pth."""
    return {"state_dict": dict(state)}


def dino_checkpoint(state):
    """DINO's dino_vitbase16_pretrain.pth: the raw backbone state dict."""
    return dict(state)


def mocov3_converted_checkpoint(state):
    """The converted MoCo v3 file the reference loads: timm keys (norm.* and a head included) under 'model'."""
    return {"model": {**state, "head.weight": torch.randn(10, 32), "head.bias": torch.randn(10)}}


def mocov3_release_checkpoint(state):
    """MoCo v3's vit-b-300ep.pth.tar: base and momentum encoders (each with a projector head), the predictor."""
    encoder = {**state, "head.0.weight": torch.randn(64, 32), "head.1.running_mean": torch.randn(64)}
    return {"epoch": 300, "arch": "vit_base",
            "state_dict": {**{f"module.base_encoder.{k}": v for k, v in encoder.items()},
                           **{f"module.momentum_encoder.{k}": v * 2 for k, v in encoder.items()},
                           "module.predictor.0.weight": torch.randn(64, 64)},
            "optimizer": {"state": {}, "param_groups": [{"lr": 1.5e-4, "params": [0, 1]}]},
            "scaler": {"scale": 65536.0, "growth_factor": 2.0}}


RELEASES = [("ibot21k", ibot_full_checkpoint), ("ibot1k", ibot_teacher_checkpoint),
            ("ibot1k", ibot_full_checkpoint), ("dino1k", dino_checkpoint),
            ("mocov3_1k", mocov3_converted_checkpoint), ("mocov3_1k", mocov3_release_checkpoint)]


def write(tmp_path, payload, name="release.pth"):
    path = tmp_path / name
    torch.save(payload, path)
    return path


def plain_pre_logits(vit, x):
    return vit.forward_head(vit.forward_features(x), pre_logits=True)


def unnormalised_cls(vit, x):
    """[CLS] after the last block, before the final norm."""
    return vit.blocks(vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x)))))[:, 0]


@pytest.mark.parametrize("alias,make_file", RELEASES, ids=[f"{a}-{f.__name__}" for a, f in RELEASES])
def test_release_layouts_load_exactly_the_backbone_weights(tmp_path, alias, make_file):
    source = source_vit()
    path = write(tmp_path, make_file(source.state_dict()))
    vit = build_backbone(alias, checkpoint_file=path, **SMALL)
    loaded = vit.state_dict()
    mocov3 = alias == "mocov3_1k"
    expected = {k: v for k, v in source.state_dict().items() if not (mocov3 and k.startswith("norm."))}
    assert set(load_backbone_checkpoint(alias, path, **SMALL)) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(loaded[key], tensor), key
    assert not any(p.requires_grad for p in vit.parameters())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = encode(vit, x)
        assert set(loaded) == set(expected)
        if mocov3:  # the reference's fc_norm build: final norm dropped, features are the raw [CLS] ...
            reference = unnormalised_cls(source, x)
            assert not torch.allclose(features, plain_pre_logits(source, x), atol=1e-3)
            # ... and a classifier starts with a fresh LayerNorm on them, which it trains
            norm = classifier_norm_layer(vit)()
            assert isinstance(norm, torch.nn.LayerNorm) and norm.eps == 1e-6
            assert torch.equal(norm.weight, torch.ones(32)) and torch.equal(norm.bias, torch.zeros(32))
            assert norm.weight.requires_grad
            torch.testing.assert_close(norm(features), F.layer_norm(reference, (32,), eps=1e-6), atol=1e-5, rtol=0)
        else:
            assert classifier_norm_layer(vit) is None
            reference = plain_pre_logits(source, x)
    torch.testing.assert_close(features, reference, atol=1e-5, rtol=0)


def test_timm_layout_alias_loads_a_safetensors_file_through_timm(tmp_path, monkeypatch):
    source = source_vit()
    path = tmp_path / "orig_in21k.safetensors"
    save_file({**source.state_dict(), "head.weight": torch.randn(21843, 32)}, str(path))
    reads = []
    read_file = backbone_module._read_file
    monkeypatch.setattr(backbone_module, "_read_file", lambda p: reads.append(p) or read_file(p))
    timm_read_file = timm.models._builder.load_state_dict
    monkeypatch.setattr(timm.models._builder, "load_state_dict", lambda p, *a, **k: reads.append(p) or
                        timm_read_file(p, *a, **k))
    vit = build_backbone("sup21k", checkpoint_file=path, **SMALL)
    assert reads == [path]  # checked and loaded from one read
    assert vit.pretrained_cfg["file"] == str(path)  # timm's pretrained path, not ours
    assert "state_dict" not in vit.pretrained_cfg and "state_dict" not in vit.default_cfg  # no copy kept
    assert vit.pretrained_cfg["tag"] == "orig_in21k"
    for key, tensor in source.state_dict().items():
        assert torch.equal(vit.state_dict()[key], tensor), key
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encode(vit, x), plain_pre_logits(source, x), atol=1e-5, rtol=0)


def test_timm_layout_file_missing_keys_is_an_error_not_a_silent_partial_load(tmp_path):
    """timm loads non-strictly once the head differs; a file without some blocks must still fail."""
    state = {k: v for k, v in source_vit().state_dict().items() if not k.startswith("blocks.1.")}
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match=r"missing 12 backbone keys, e\.g\. blocks\.1\.norm1\.weight"):
        build_backbone("sup1k", checkpoint_file=path, **SMALL)


def one_line_error(call, match):
    with pytest.raises(ValueError, match=match) as err:
        call()
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize("check", [check_backbone, load_backbone_checkpoint,
                                   lambda name, path, **kw: build_backbone(name, checkpoint_file=path, **kw)],
                         ids=["check_backbone", "load_backbone_checkpoint", "build_backbone"])
def test_bad_files_are_one_line_errors(tmp_path, check):
    state = source_vit().state_dict()
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    one_line_error(lambda: check("ibot21k", corrupt, **SMALL),
                   "corrupt or unreadable: not a PyTorch checkpoint: neither a zip archive nor a pickle")
    bad_pickle = tmp_path / "bad_pickle.pth"
    bad_pickle.write_bytes(b"\x80\x02[garbage" + bytes(range(256)))
    message = one_line_error(lambda: check("ibot21k", bad_pickle, **SMALL), "corrupt or unreadable")
    assert "weights_only" not in message  # torch's advice to unpickle untrusted code is not passed on
    one_line_error(lambda: check("dino1k", tmp_path / "absent.pth", **SMALL), "does not exist")

    dino = write(tmp_path, dino_checkpoint(state), "dino.pth")
    one_line_error(lambda: check("mocov3_1k", dino, **SMALL), "is not a MoCo v3 checkpoint")
    one_line_error(lambda: check("ibot21k", dino, **SMALL), "is not an iBOT release checkpoint")
    ibot = write(tmp_path, ibot_full_checkpoint(state), "ibot.pth")
    one_line_error(lambda: check("dino1k", ibot, **SMALL), "is not a DINO release checkpoint")

    partial = {k: v for k, v in state.items() if not k.startswith("blocks.1.")}
    partial_mocov3 = write(tmp_path, mocov3_release_checkpoint(partial), "partial.pth.tar")
    one_line_error(lambda: check("mocov3_1k", partial_mocov3, **SMALL),
                   r"does not fit backbone 'mocov3_1k': missing 12 backbone keys, e\.g\. blocks\.1\.norm1\.weight")
    random_dict = write(tmp_path, {"foo": torch.randn(3), "bar": torch.randn(2)}, "random.pth")
    one_line_error(lambda: check("mocov3_1k", random_dict, **SMALL), "is not a MoCo v3 checkpoint")
    one_line_error(lambda: check("dino1k", random_dict, **SMALL), r"missing 30 backbone keys, e\.g\. cls_token")

    wider = {**SMALL, "embed_dim": 48}
    one_line_error(lambda: check("ibot21k", ibot, **wider), r"cls_token has shape \(1, 1, 32\), the model needs "
                                                           r"\(1, 1, 48\) \(\d+ keys differ\)")


class NotAWeight:
    pass


def test_a_pickled_object_is_refused_naming_it(tmp_path):
    path = write(tmp_path, {"teacher": {}, "args": NotAWeight()})
    message = one_line_error(lambda: check_backbone("ibot21k", path, **SMALL), "corrupt or unreadable")
    assert "NotAWeight" in message


@pytest.mark.parametrize("alias,release_file", [("ibot21k", "checkpoint.pth"), ("ibot1k", "checkpoint_teacher.pth"),
                                                ("mocov3_1k", "vit-b-300ep.pth.tar")])
def test_release_only_alias_without_its_file_names_the_file(alias, release_file):
    match = f"{release_file} with --checkpoint-file"
    one_line_error(lambda: build_backbone(alias, pretrained=True), match)
    one_line_error(lambda: check_backbone(alias), match)
    check_backbone(alias, pretrained=False)  # a random-init control needs no file
    assert build_backbone(alias, pretrained=False, **SMALL).blocks[0].attn.num_heads == 2


def test_check_backbone_names():
    for name in ("sup21k", "dino1k", "vit_base_patch16_224.augreg_in21k", "vit_digits"):
        check_backbone(name)  # hub weights or local ones: nothing to check without a file
    one_line_error(lambda: check_backbone("ibot22k"), "unknown backbone")


@pytest.mark.parametrize("name,family", [
    *[(alias, alias) for alias in SEED_BACKBONES],
    ("vit_base_patch16_224.orig_in21k", "sup21k"), ("vit_base_patch16_224.dino", "dino1k"),
    ("vit_base_patch16_224.augreg_in21k", "sup21k_augreg"), ("vit_base_patch16_224.augreg2_in21k_ft_in1k", "sup1k"),
    ("vit_base_patch16_224.augreg_in21k_ft_in1k", "sup1k_augreg"),
    ("vit_base_patch16_224", "sup1k"),  # timm's default tag
    ("vit_base_patch16_224.augreg_in1k", None), ("vit_tiny_patch16_224.augreg_in21k", None),
    ("vit_digits", None), ("not_a_model", None)])
def test_backbone_family(name, family):
    assert backbone_family(name) == family


def test_every_alias_is_a_vit_b16_at_224():
    assert set(SEED_BACKBONES) == {"sup21k", "sup1k", "sup1k_augreg", "sup21k_augreg", "ibot21k", "ibot1k", "dino1k",
                                   "mocov3_1k"}
    for alias, seed in SEED_BACKBONES.items():
        check_backbone_name(alias)
        assert input_shape(alias) == (3, 224, 224)
        with torch.device("meta"):
            vit = build_backbone(alias)
        assert attention_geometry(vit) == (12, 12, 64)
        assert vit.blocks[0].attn.qkv.bias is not None and vit.blocks[0].norm1.eps == 1e-6
        # MoCo v3: no final norm, and the [CLS] LayerNorm goes to the classifier (built on demand)
        hands_norm_over = classifier_norm_layer(vit) is not None
        assert hands_norm_over == (alias == "mocov3_1k") == isinstance(vit.norm, torch.nn.Identity)
        assert isinstance(vit.fc_norm, torch.nn.Identity)
        assert seed.tag is not None or seed.release_file  # release-only weights name their file
