"""Frozen timm ViT backbones built with the prefix-attention layers.

Any timm Vision Transformer name (prefer the full ``arch.tag``) is accepted, and the project's own
small ViTs (``vit_digits`` for the 8x8 digits fixture, ``vit_glyphs28`` for the 28-px benchmarks),
whose weights promptcl.core.pretrain makes offline. Pretrained weights come from
timm (``pretrained=True``) or from a local checkpoint file, through timm's own loading path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from promptcl.core import pretrain
from promptcl.core.attention import LayerPrompt, PrefixAttention, PromptBlock

# Architecture of each project-made backbone (their weights: promptcl.core.pretrain).
LOCAL_BACKBONES: dict[str, dict] = {name: spec.architecture for name, spec in pretrain.LOCAL_BACKBONES.items()}


def check_backbone_name(name: str) -> None:
    """Raise a clear error unless ``name`` is a local backbone or a timm Vision Transformer."""
    if name in LOCAL_BACKBONES:
        return
    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        raise ValueError(f"unknown backbone {name!r}: not a timm model nor one of {sorted(LOCAL_BACKBONES)}")
    if not _is_vision_transformer(arch):
        raise ValueError(f"backbone {name!r} is not a timm VisionTransformer")
    if tag and name not in timm.list_pretrained(f"{arch}.*"):
        raise ValueError(f"unknown pretrained tag {tag!r} for backbone {arch!r}")


def _is_vision_transformer(arch: str) -> bool:
    return timm.models.model_entrypoint(arch).__module__ == "timm.models.vision_transformer"


def build_backbone(
    name: str,
    *,
    pretrained: bool = False,
    checkpoint_file: Optional[Path] = None,
    **overrides,
) -> VisionTransformer:
    """A frozen, headless ViT whose blocks accept prefix prompts.

    ``pretrained`` loads timm's published weights (for local backbones: the offline-made ones).

    ``checkpoint_file`` loads weights through timm's pretrained path from a local file instead of
    the hub (``pretrained_cfg_overlay=dict(file=...)``).
    """
    check_backbone_name(name)
    layers = dict(block_fn=PromptBlock, attn_layer=PrefixAttention, num_classes=0)
    if name in LOCAL_BACKBONES:
        if pretrained and checkpoint_file is None:
            checkpoint_file = pretrain.local_checkpoint(name)
        model = VisionTransformer(**{**LOCAL_BACKBONES[name], **overrides, **layers})
        if checkpoint_file is not None:
            state = read_checkpoint(checkpoint_file)
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
            try:
                model.load_state_dict(state)
            except RuntimeError as err:
                raise ValueError(f"checkpoint file {str(checkpoint_file)!r} does not fit backbone {name!r}: "
                                 f"{str(err).splitlines()[0]}") from err
    else:
        kwargs = {**overrides, **layers}
        if checkpoint_file is not None:
            read_checkpoint(checkpoint_file)  # fail early and clearly on a corrupt file
            kwargs["pretrained_cfg_overlay"] = dict(file=str(checkpoint_file))
            pretrained = True
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    model.requires_grad_(False)
    model.eval()
    return model


def read_checkpoint(path: Path) -> Mapping[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint file {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch/safetensors raise many types for a damaged file
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"checkpoint file {str(path)!r} is corrupt or unreadable: {first_line}") from err
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint file {str(path)!r} is not a state dict of tensors")
    return state


def encode(
    vit: VisionTransformer,
    images: torch.Tensor,
    prompts: Optional[Mapping[int, LayerPrompt]] = None,
    *,
    input_tokens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Pre-logits feature (the [CLS] token after the final norm), with per-layer prompts.

    Mirrors ``VisionTransformer.forward_features`` + ``forward_head(pre_logits=True)``."""
    return vit.forward_head(encode_tokens(vit, images, prompts, input_tokens=input_tokens), pre_logits=True)


def encode_tokens(
    vit: VisionTransformer,
    images: torch.Tensor,
    prompts: Optional[Mapping[int, LayerPrompt]] = None,
    *,
    input_tokens: Optional[torch.Tensor] = None,
    input_tokens_positioned: bool = True,
) -> torch.Tensor:
    """All output tokens after the final norm, ``[B, tokens, dim]``.

    ``prompts``: prefix prompts per block. ``input_tokens`` ``[B, P, dim]``: prompt tuning, P tokens
    inserted right after the class (and register) tokens, so the sequence is ``[CLS, prompts, patches]``;
    each gets the class token's position embedding (L2P's PyTorch layout) unless
    ``input_tokens_positioned`` is False (S-Prompts: no position embedding)."""
    prompts = prompts or {}
    if prompts and max(prompts) >= len(vit.blocks):
        raise ValueError(f"prompt for layer {max(prompts)} but the backbone has {len(vit.blocks)} blocks")
    x = vit.patch_embed(images)
    x = vit._pos_embed(x)
    if input_tokens is not None:
        if input_tokens.dim() != 3 or input_tokens.shape[0] != x.shape[0] or input_tokens.shape[2] != x.shape[2]:
            raise ValueError(f"input prompt tokens must be [B={x.shape[0]}, P, {x.shape[2]}], "
                             f"got {tuple(input_tokens.shape)}")
        if input_tokens_positioned and vit.cls_token is not None and not vit.no_embed_class:
            input_tokens = input_tokens + vit.pos_embed[:, :1]
        n = vit.num_prefix_tokens
        x = torch.cat([x[:, :n], input_tokens.to(x.dtype), x[:, n:]], dim=1)
    x = vit.patch_drop(x)
    x = vit.norm_pre(x)
    for i, block in enumerate(vit.blocks):
        x = block(x, prompt=prompts.get(i))
    return vit.norm(x)


def input_shape(name: str, img_size: Optional[int] = None) -> tuple[int, int, int]:
    """(channels, height, width) a backbone takes; ``img_size`` overrides a timm model's default."""
    if name in LOCAL_BACKBONES:
        cfg = LOCAL_BACKBONES[name]
        return (cfg["in_chans"], cfg["img_size"], cfg["img_size"])
    size = img_size or timm.get_pretrained_cfg(name.partition(".")[0]).input_size[-1]
    return (3, size, size)


def attention_geometry(vit: VisionTransformer) -> tuple[int, int, int]:
    """(depth, heads, head_dim) of a backbone."""
    attn = vit.blocks[0].attn
    return len(vit.blocks), attn.num_heads, attn.head_dim

