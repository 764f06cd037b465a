"""Frozen timm ViT backbones built with the prefix-attention layers.

A backbone name is one of:

* an alias of ``SEED_BACKBONES``: the ViT-B/16 backbones the seed papers (NoRGa/HiDe, SMoPE) report on,
  supervised ones from the timm hub and self-supervised ones (iBOT, DINO, MoCo v3) from their
  release files, whose nested layouts are converted to timm keys here;
* any timm Vision Transformer name (prefer the full ``arch.tag``);
* the project's own small ViTs (``vit_digits`` for the 8x8 digits fixture, ``vit_glyphs28`` for the
  28-px benchmarks), whose weights promptcl.core.pretrain makes offline.

A timm-layout checkpoint file loads through timm's own pretrained path; every file is first checked
(keys, shapes) against the model the name builds, on the meta device, so a wrong file fails before any work.
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Optional

import timm
import torch
from timm.models import clean_state_dict
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from promptcl.core import pretrain
from promptcl.core.attention import LayerPrompt, PrefixAttention, PromptBlock

# Architecture of each project-made backbone (their weights: promptcl.core.pretrain).
LOCAL_BACKBONES: dict[str, dict] = {name: spec.architecture for name, spec in pretrain.LOCAL_BACKBONES.items()}


@dataclass(frozen=True)
class SeedBackbone:
    """A backbone a seed paper reports on: its timm architecture and where its weights come from."""

    paper_name: str
    arch: str
    tag: Optional[str]  # timm pretrained tag; None: no hub weights, the release file is required
    layout: str  # a key of CHECKPOINT_LAYOUTS: how the release file nests its tensors
    source: str
    release_file: Optional[str] = None  # the file to pass as checkpoint_file when there is no hub tag
    arch_overrides: Mapping[str, Any] = field(default_factory=dict, hash=False)
    # The reference builds it with a LayerNorm on the pooled token (``fc_norm``) that no release file
    # holds and trains it with the classifier: the frozen backbone is built without it (its features
    # are the raw token) and hands the classifier a fresh one (``classifier_norm_layer``).
    classifier_norm: bool = False

    @property
    def timm_name(self) -> str:
        return f"{self.arch}.{self.tag}" if self.tag else self.arch


SEED_BACKBONES: dict[str, SeedBackbone] = {
    "sup21k": SeedBackbone(
        "Sup-21K", "vit_base_patch16_224", "orig_in21k", "timm",
        source="original (non-AugReg) JAX ImageNet-21k ViT-B/16 (ViT-B_16.npz, timm hub: orig_in21k), NoRGa/HiDe's"),
    "sup1k": SeedBackbone(
        "Sup-1K", "vit_base_patch16_224", "augreg2_in21k_ft_in1k", "timm",
        source="AugReg2 in21k fine-tuned on in1k, SMoPE's CIFAR-100 and ImageNet-R backbone"),
    "sup1k_augreg": SeedBackbone(
        "Sup-1K AugReg", "vit_base_patch16_224", "augreg_in21k_ft_in1k", "timm",
        source="AugReg in21k fine-tuned on in1k: timm 0.4.12's vit_base_patch16_224, which CODA-Prompt's and "
               "OVOR's code (timm==0.4.12) load"),
    "sup21k_augreg": SeedBackbone(
        "Sup-21K AugReg", "vit_base_patch16_224", "augreg_in21k", "timm",
        source="AugReg ImageNet-21k (vit_base_patch16_224_augreg_in21k.bin), SMoPE's CUB-200 backbone"),
    "ibot21k": SeedBackbone(
        "iBOT-21K", "vit_base_patch16_224", None, "ibot", release_file="checkpoint.pth",
        source="iBOT ViT-B/16 ImageNet-22k full checkpoint (vitb_16_pt22k/checkpoint.pth): its 'teacher' backbone"),
    "ibot1k": SeedBackbone(
        "iBOT-1K", "vit_base_patch16_224", None, "ibot", release_file="checkpoint_teacher.pth",
        source="iBOT ViT-B/16 ImageNet-1k teacher checkpoint_teacher.pth (NoRGa renames it "
               "ibot_vitbase16_pretrain.pth)"),
    "dino1k": SeedBackbone(
        "DINO-1K", "vit_base_patch16_224", "dino", "dino", release_file="dino_vitbase16_pretrain.pth",
        source="DINO ViT-B/16 release dino_vitbase16_pretrain.pth (timm hub: vit_base_patch16_224.dino)"),
    "mocov3_1k": SeedBackbone(
        "MoCo v3-1K", "vit_base_patch16_224", None, "mocov3", release_file="vit-b-300ep.pth.tar",
        source="MoCo v3 ViT-B/16 300-epoch release vit-b-300ep.pth.tar, or the converted mocov3-vit-base-300ep.pth "
               "NoRGa loads; built like the reference with fc_norm: no final norm (the release's norm.* is "
               "dropped), and an LN on the raw [CLS] that no release holds, which trains with the classifier",
        arch_overrides={"fc_norm": True}, classifier_norm=True),
}


def backbone_family(name: str) -> Optional[str]:
    """The seed alias a backbone name stands for (an alias, or a timm name with that alias's weights), else None.

    An untagged timm name means timm's default tag (``vit_base_patch16_224`` is ``...augreg2_in21k_ft_in1k``)."""
    if name in SEED_BACKBONES:
        return name
    if name in LOCAL_BACKBONES or not timm.is_model(name):
        return None
    arch, _, tag = name.partition(".")
    tag = tag or timm.models.get_pretrained_cfg(arch).tag
    return next((alias for alias, seed in SEED_BACKBONES.items() if seed.tag and (seed.arch, seed.tag) == (arch, tag)),
                None)


def check_backbone_name(name: str) -> None:
    """Raise a clear error unless ``name`` is a seed alias, a local backbone or a timm Vision Transformer."""
    if name in SEED_BACKBONES:
        name = SEED_BACKBONES[name].timm_name
    if name in LOCAL_BACKBONES:
        return
    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        raise ValueError(f"unknown backbone {name!r}: not a timm model nor one of "
                         f"{sorted(LOCAL_BACKBONES) + sorted(SEED_BACKBONES)}")
    if not _is_vision_transformer(arch):
        raise ValueError(f"backbone {name!r} is not a timm VisionTransformer")
    if tag and name not in timm.list_pretrained(f"{arch}.*"):
        raise ValueError(f"unknown pretrained tag {tag!r} for backbone {arch!r}")


def _is_vision_transformer(arch: str) -> bool:
    return timm.models.model_entrypoint(arch).__module__ == "timm.models.vision_transformer"


def check_backbone(name: str, checkpoint_file: Optional[Path] = None, pretrained: bool = True, **overrides) -> None:
    """Raise ValueError (one line) on any bad backbone input, before any work: an unknown name, a
    release-only backbone without its file, a corrupt file, a file of another layout or shapes.

    Costs a read of the file and a meta-device model; ``overrides`` shape that model (as for
    build_backbone). A local backbone's own weights are checked by promptcl.core.pretrain."""
    check_backbone_name(name)
    if checkpoint_file is not None:
        load_backbone_checkpoint(name, checkpoint_file, **overrides)
        return
    seed = SEED_BACKBONES.get(name)
    if pretrained and seed is not None and seed.tag is None:
        raise ValueError(_release_file_required(name, seed))


def cache_hub_weights(name: str) -> None:
    """Put a timm backbone's published weights in the local Hugging Face cache before any work, when
    timm would fetch them from the hub: found there, or fetched now. With HF_HUB_OFFLINE set a
    missing file, and online an unreachable hub or repository, is a one-line error here instead of a
    traceback once the data is read (and the trials of a local study do not race to fetch it).
    Where they come from is timm's own choice (a hub repo and file, or its old cache of a URL's file)."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import RemoteEntryNotFoundError
    from timm.models._builder import _resolve_pretrained_source
    from timm.models._hub import HF_WEIGHTS_NAME, _get_safe_alternatives, hf_split

    if name in LOCAL_BACKBONES:
        return
    cfg = timm.get_pretrained_cfg(SEED_BACKBONES[name].timm_name if name in SEED_BACKBONES else name)
    if cfg is None:
        return
    source, location = _resolve_pretrained_source(cfg.to_dict())
    if source != "hf-hub":  # a file, timm's old cache, or a URL (torch.hub's download at build time)
        return
    repo, filename = location if isinstance(location, tuple) else (location, HF_WEIGHTS_NAME)
    repo_id, revision = hf_split(repo)
    # timm's order: a .safetensors file as it is, else its safetensors alternatives, then the file
    candidates = (filename,) if filename.endswith(".safetensors") else (*_get_safe_alternatives(filename), filename)
    if any(isinstance(try_to_load_from_cache(repo_id, f, revision=revision), str) for f in candidates):
        return
    if constants.HF_HUB_OFFLINE:
        raise ValueError(f"backbone {name!r}: its weights ({repo_id}) are not in the local Hugging Face cache and "
                         "HF_HUB_OFFLINE is set; fetch them once online, or pass --checkpoint-file")
    for i, file in enumerate(candidates):
        try:
            hf_hub_download(repo_id, file, revision=revision)
            return
        except RemoteEntryNotFoundError:  # the repository lacks this file: timm tries the next
            if i == len(candidates) - 1:
                raise ValueError(f"backbone {name!r}: the hub repository {repo_id} has none of "
                                 f"{', '.join(candidates)}") from None
        except OSError as err:  # unreachable hub, unknown repository or revision, refused access
            message = str(err).strip()
            reason = message.splitlines()[0].rstrip(".") if message else type(err).__name__
            raise ValueError(f"backbone {name!r}: its weights ({repo_id}) could not be fetched from the Hugging "
                             f"Face hub ({constants.ENDPOINT}): {reason}; pass --checkpoint-file to use a "
                             "local file") from None


def _release_file_required(name: str, seed: SeedBackbone) -> str:
    return (f"backbone {name!r} ({seed.paper_name}) has no timm hub weights: pass its release file "
            f"{seed.release_file} with --checkpoint-file (or use a random init)")


def build_backbone(
    name: str,
    *,
    pretrained: bool = False,
    checkpoint_file: Optional[Path] = None,
    **overrides,
) -> VisionTransformer:
    """A frozen, headless ViT whose blocks accept prefix prompts.

    ``pretrained`` loads timm's published weights (for a seed alias: its hub tag; for local
    backbones: the offline-made ones). A seed alias without a hub tag needs its release file.

    ``checkpoint_file`` loads weights from a local file instead, read once: a timm-layout file through
    timm's pretrained path (its filter, as its state dict), a release file of another layout
    converted to timm keys. Either way the file must hold every backbone weight the model needs.
    """
    check_backbone_name(name)
    seed = SEED_BACKBONES.get(name)
    if name in LOCAL_BACKBONES and pretrained and checkpoint_file is None:
        checkpoint_file = pretrain.local_checkpoint(name)
    if seed is not None and pretrained and checkpoint_file is None and seed.tag is None:
        raise ValueError(_release_file_required(name, seed))
    if checkpoint_file is None:
        model = _architecture(name, overrides, pretrained=pretrained)
    elif _layout(name) == "timm" and name not in LOCAL_BACKBONES:
        # Read once: checked here (timm loads non-strictly once the head differs, num_classes=0, so a
        # missing key would pass silently), then handed to timm's pretrained path as its state dict
        state = load_backbone_checkpoint(name, checkpoint_file, **overrides)
        model = _architecture(name, overrides, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(checkpoint_file), state_dict=state))
        del model.pretrained_cfg["state_dict"]  # the config names the file; it keeps no copy of the weights
    else:
        model = _architecture(name, overrides)
        state = _fitted_state(name, checkpoint_file, model)
        if not next(model.parameters()).is_meta:  # on the meta device (a free validation build) copying is a no-op
            model.load_state_dict(state)
    model.requires_grad_(False)
    model.eval()
    return model


def _architecture(name: str, overrides: Mapping[str, Any], *, pretrained: bool = False,
                  **timm_kwargs) -> VisionTransformer:
    layers = dict(block_fn=PromptBlock, attn_layer=PrefixAttention, num_classes=0)
    if name in LOCAL_BACKBONES:
        return VisionTransformer(**{**LOCAL_BACKBONES[name], **overrides, **layers})
    seed = SEED_BACKBONES.get(name)
    timm_name, arch_overrides = (seed.timm_name, seed.arch_overrides) if seed else (name, {})
    model = timm.create_model(timm_name, pretrained=pretrained, **{**arch_overrides, **overrides, **layers},
                              **timm_kwargs)
    if seed is not None and seed.classifier_norm:
        norm = model.fc_norm
        model.fc_norm = torch.nn.Identity()
        model.classifier_norm_layer = functools.partial(type(norm), norm.normalized_shape, eps=norm.eps)
    return model


def classifier_norm_layer(vit: VisionTransformer) -> Optional[Callable[[], torch.nn.Module]]:
    """A factory of the norm a classifier on ``vit``'s features starts with, where the reference trains
    one with it (MoCo v3 as NoRGa's and HiDe-Prompt's code build it), else None."""
    return getattr(vit, "classifier_norm_layer", None)


def _meta_architecture(name: str, overrides: Mapping[str, Any]) -> VisionTransformer:
    with torch.device("meta"):
        return _architecture(name, overrides)


def _layout(name: str) -> str:
    return SEED_BACKBONES[name].layout if name in SEED_BACKBONES else "timm"


def load_backbone_checkpoint(name: str, path: Path, **overrides) -> dict[str, torch.Tensor]:
    """The backbone weights of ``name``'s checkpoint file, converted from its layout to timm keys.

    Keys the model lacks (heads, projectors, the momentum encoder, iBOT's masked_embed) are dropped,
    as the reference's loaders do; a missing backbone key or a wrong shape is a one-line ValueError.
    ``overrides`` (e.g. a scaled-down ``embed_dim``) shape the model the file is checked against."""
    check_backbone_name(name)
    return _fitted_state(name, path, _meta_architecture(name, overrides))


def _fitted_state(name: str, path: Path, model: VisionTransformer) -> dict[str, torch.Tensor]:
    layout = CHECKPOINT_LAYOUTS[_layout(name)]
    state = layout.to_timm_keys(_read_file(path))
    if not state:
        raise ValueError(f"checkpoint file {str(path)!r} is not {layout.description}")
    if _layout(name) == "timm":
        state = checkpoint_filter_fn(state, model)  # timm's own conversion: pos-embed resampling, old layouts
    needed = model.state_dict()
    missing = [k for k in needed if k not in state]
    if missing:
        raise ValueError(f"checkpoint file {str(path)!r} does not fit backbone {name!r}: missing {len(missing)} "
                         f"backbone keys, e.g. {missing[0]}")
    wrong = [k for k in needed if k in state and state[k].shape != needed[k].shape]
    if wrong:
        raise ValueError(f"checkpoint file {str(path)!r} does not fit backbone {name!r}: {wrong[0]} has shape "
                         f"{tuple(state[wrong[0]].shape)}, the model needs {tuple(needed[wrong[0]].shape)}"
                         f" ({len(wrong)} keys differ)")
    return {k: state[k] for k in needed if k in state}


def _tensor_dict(value: Any) -> Optional[Mapping[str, torch.Tensor]]:
    """``value`` if it is a non-empty state dict (str -> tensor), else None."""
    if isinstance(value, Mapping) and value and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                    for k, v in value.items()):
        return value
    return None


def _under_prefix(state: Optional[Mapping[str, torch.Tensor]], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``state`` whose keys start with ``prefix``, without it (empty for no state)."""
    return {k[len(prefix):]: v for k, v in (state or {}).items() if k.startswith(prefix)}


def _child(raw: Any, key: str) -> Any:
    return raw.get(key) if isinstance(raw, Mapping) else None


def _timm_layout(raw: Any) -> Mapping[str, torch.Tensor]:
    """A timm/PyTorch state dict, maybe under the keys timm's file loader looks in (EMA first, as timm does)."""
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if _child(raw, key) is not None:
            raw = raw[key]
            break
    state = _tensor_dict(raw)
    return clean_state_dict(state) if state else {}


def _ibot_layout(raw: Any) -> Mapping[str, torch.Tensor]:
    """iBOT: the full checkpoint's ``teacher`` (a MultiCropWrapper: ``backbone.*`` and ``head.*``),
    or the teacher-only release ``{'state_dict': <timm keys>}``."""
    teacher = _under_prefix(_tensor_dict(_child(raw, "teacher")), "backbone.")
    return teacher or _tensor_dict(_child(raw, "state_dict")) or {}


def _dino_layout(raw: Any) -> Mapping[str, torch.Tensor]:
    """DINO's backbone release: a flat state dict with timm key names."""
    return _tensor_dict(raw) or {}


def _mocov3_layout(raw: Any) -> Mapping[str, torch.Tensor]:
    """MoCo v3: the converted ``{'model': <timm keys>}`` the reference loads, or the official release
    ``{'state_dict': {'module.base_encoder.*', 'module.momentum_encoder.*', 'module.predictor.*'}}``,
    whose base encoder is the backbone (its ``head.*`` is the projector, dropped as the model lacks it)."""
    converted = _tensor_dict(_child(raw, "model"))
    if converted:
        return converted
    release = clean_state_dict(_tensor_dict(_child(raw, "state_dict")) or {})  # strips DDP's module.
    return _under_prefix(release, "base_encoder.")


class CheckpointLayout(NamedTuple):
    description: str  # what a file of this layout is, for the error on a file that is not
    to_timm_keys: Callable[[Any], Mapping[str, torch.Tensor]]  # empty when the file is not of this layout


CHECKPOINT_LAYOUTS: dict[str, CheckpointLayout] = {
    "timm": CheckpointLayout("a state dict of tensors", _timm_layout),
    "ibot": CheckpointLayout("an iBOT release checkpoint (no 'teacher' with backbone.* tensors "
                             "nor a 'state_dict' of tensors)", _ibot_layout),
    "dino": CheckpointLayout("a DINO release checkpoint (not a flat state dict of tensors)", _dino_layout),
    "mocov3": CheckpointLayout("a MoCo v3 checkpoint (no 'model' state dict nor a 'state_dict' "
                               "with module.base_encoder.* tensors)", _mocov3_layout),
}


def _read_file(path: Path) -> Any:
    """The object a checkpoint file holds, read safely: tensors and plain containers only
    (plus argparse.Namespace, which iBOT's full checkpoint stores its training args as)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint file {str(path)!r} does not exist")
    if path.suffix == ".npz":
        raise ValueError(f"checkpoint file {str(path)!r} is a JAX .npz file: use timm's converted weights "
                         f"(its hub tag, or that tag's .safetensors file)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        with open(path, "rb") as f:
            header = f.read(2)
        if not header.startswith((b"PK", b"\x80")):  # torch.save writes a zip archive (or, before 1.6, a pickle)
            raise ValueError("not a PyTorch checkpoint: neither a zip archive nor a pickle")
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch/safetensors raise many types for a damaged file
        raise ValueError(f"checkpoint file {str(path)!r} is corrupt or unreadable: {_reason(err)}") from err


def _reason(err: Exception) -> str:
    """One line of a load error: torch's refusal of a pickled object names it after "WeightsUnpickler
    error:", on that line or the next (its advice to load with weights_only=False is left out)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            detail = line.split("WeightsUnpickler error:", 1)[1].strip() or (lines[i + 1] if i + 1 < len(lines) else "")
            return f"WeightsUnpickler error: {detail}"
    return lines[0] if lines and not lines[0].isdigit() else f"{type(err).__name__} {' '.join(lines)}".strip()


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


def backbone_mean_std(backbone: str) -> tuple[tuple, tuple]:
    """The input mean/std a backbone was pretrained with (the common protocol normalises so): timm's
    for hub weights, ImageNet's for the self-supervised releases without a hub tag (iBOT, MoCo v3)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    seed = SEED_BACKBONES.get(backbone)
    if seed is not None and seed.tag is None:
        return IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    cfg = timm.get_pretrained_cfg(seed.timm_name if seed else backbone)
    if cfg is None:  # not a timm name: the ImageNet-21k ViTs' statistics
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    return tuple(cfg.mean), tuple(cfg.std)


def input_shape(name: str, img_size: Optional[int] = None) -> tuple[int, int, int]:
    """(channels, height, width) a backbone takes; ``img_size`` overrides its default."""
    if name in LOCAL_BACKBONES:
        cfg = LOCAL_BACKBONES[name]
        size = img_size or cfg["img_size"]
        return (cfg["in_chans"], size, size)
    if name in SEED_BACKBONES:
        name = SEED_BACKBONES[name].arch
    size = img_size or timm.get_pretrained_cfg(name.partition(".")[0]).input_size[-1]
    return (3, size, size)


def attention_geometry(vit: VisionTransformer) -> tuple[int, int, int]:
    """(depth, heads, head_dim) of a backbone."""
    attn = vit.blocks[0].attn
    return len(vit.blocks), attn.num_heads, attn.head_dim

