"""Backbone construction: timm names, local checkpoint files, the offline-pretrained digits ViT."""

import pytest
import timm
import torch
from safetensors.torch import save_file

from promptcl.core.attention import PrefixAttention, PromptBlock
from promptcl.core.backbone import build_backbone, check_backbone_name, encode


def test_pretrained_path_loads_a_checkpoint_file_through_timm(tmp_path):
    """The real ViT loading path (pretrained=True), fed from a file instead of the hub."""
    torch.manual_seed(0)
    source = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0)
    path = tmp_path / "vit_tiny.safetensors"
    save_file(source.state_dict(), str(path))
    vit = build_backbone("vit_tiny_patch16_224.augreg_in21k_ft_in1k", checkpoint_file=path, img_size=32)
    assert isinstance(vit.blocks[0], PromptBlock) and isinstance(vit.blocks[0].attn, PrefixAttention)
    for name, tensor in source.state_dict().items():
        assert torch.equal(vit.state_dict()[name], tensor), name
    assert not any(p.requires_grad for p in vit.parameters())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(encode(vit, x), source.forward_head(source.forward_features(x), pre_logits=True),
                               atol=1e-5, rtol=0)


def test_corrupt_or_missing_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt or unreadable"):
        build_backbone("vit_tiny_patch16_224", checkpoint_file=bad)
    with pytest.raises(ValueError, match="does not exist"):
        build_backbone("vit_digits", checkpoint_file=tmp_path / "missing.pt")


@pytest.mark.parametrize("name,match", [("resnet50", "not a timm VisionTransformer"),
                                        ("vit_nope", "unknown backbone"),
                                        ("vit_base_patch16_224.nope", "unknown pretrained tag")])
def test_bad_backbone_names(name, match):
    with pytest.raises(ValueError, match=match):
        check_backbone_name(name)


def test_glyph_pretrained_digits_backbone_beats_random_init():
    """The offline-made weights must carry signal a random-init ViT lacks (nearest class mean)."""
    from promptcl.data.benchmarks import load_digits

    data = load_digits()
    x, y = data.train.tensors
    xt, yt = data.test.tensors

    def ncm_accuracy(vit):
        with torch.no_grad():
            f, ft = encode(vit, x), encode(vit, xt)
        means = torch.stack([f[y == c].mean(0) for c in range(10)])
        return (torch.cdist(ft, means).argmin(1) == yt).float().mean().item()

    torch.manual_seed(0)
    pretrained = ncm_accuracy(build_backbone("vit_digits", pretrained=True))
    random_init = ncm_accuracy(build_backbone("vit_digits", pretrained=False))
    assert pretrained > 0.8 and pretrained > random_init + 0.2
