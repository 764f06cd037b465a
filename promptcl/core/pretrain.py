"""Offline pretraining of the embedded benchmark's micro ViT on rendered letter glyphs.

No published weights fit an 8x8 ViT and nothing may be downloaded, yet a frozen random-init ViT
gives features far worse than raw pixels. So ``vit_digits`` is pretrained here, deterministically,
on letters rendered from the fonts matplotlib ships (no digits and no digit look-alikes, so the
pretraining data is disjoint from the benchmark), rendered like the UCI digits: a glyph filling a
32x32 box, pooled to 8x8. The checkpoint is made once and cached (``PROMPTCL_CACHE`` or
``~/.cache/promptcl``).
"""

from __future__ import annotations

import fcntl
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# Letters that can pass for a digit (O/0, I/l/1, S/5, Z/2, B/8, G/6, b/6, g/q/9) are left out.
GLYPHS = "ACDEFHJKLMNPQRTUVWXYacdefhijkmnprtuvwxy"
FONT_FILES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf",
    "cmr10.ttf", "cmss10.ttf", "cmb10.ttf", "cmtt10.ttf",
)


@dataclass(frozen=True)
class GlyphPretraining:
    steps: int = 1500
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.05
    seed: int = 0

    def cache_name(self) -> str:
        key = "-".join(f"{k}{v}" for k, v in asdict(self).items())
        return f"vit_digits_glyphs_v1_{key}.safetensors"


def _font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf"


def render_glyph_bank() -> tuple[torch.Tensor, torch.Tensor]:
    """Every glyph in every font: ``[n, 1, 32, 32]`` ink in [0, 1], bounding box fitted to 28 px."""
    from PIL import Image, ImageDraw, ImageFont

    images, labels = [], []
    for font_file in FONT_FILES:
        path = _font_dir() / font_file
        if not path.is_file():
            continue
        font = ImageFont.truetype(str(path), 64)
        for label, char in enumerate(GLYPHS):
            canvas = Image.new("L", (128, 128), 0)
            ImageDraw.Draw(canvas).text((20, 10), char, fill=255, font=font)
            box = canvas.getbbox()
            if box is None:
                continue
            glyph = canvas.crop(box)
            scale = 28 / max(glyph.size)
            size = (max(1, round(glyph.size[0] * scale)), max(1, round(glyph.size[1] * scale)))
            glyph = glyph.resize(size, Image.BILINEAR)
            frame = Image.new("L", (32, 32), 0)
            frame.paste(glyph, ((32 - size[0]) // 2, (32 - size[1]) // 2))
            images.append(np.asarray(frame, dtype=np.float32) / 255.0)
            labels.append(label)
    if not images:
        raise RuntimeError(f"no fonts found under {_font_dir()}")
    return torch.tensor(np.stack(images))[:, None], torch.tensor(labels)


def augment_to_digits_format(glyphs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random affine + stroke-width jitter at 32 px, then 4x4 pooling to 8x8 scaled to [-1, 1]."""
    n = glyphs.shape[0]

    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    angle = uniform(-0.3, 0.3)
    scale = uniform(0.85, 1.15)
    shear = uniform(-0.3, 0.3)
    shift = torch.stack([uniform(-0.12, 0.12), uniform(-0.12, 0.12)], dim=1)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin + shear, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(glyphs.shape), align_corners=False)
    x = F.grid_sample(glyphs, grid, align_corners=False)
    thicker = torch.rand(n, generator=generator) < 0.4
    x = torch.where(thicker[:, None, None, None], F.max_pool2d(x, 3, 1, 1), x)
    x = (x > 0.5).float()  # the UCI digits are binary bitmaps before pooling
    x = F.avg_pool2d(x, 4)
    return (x - 0.5) / 0.5


def pretrain_digits_backbone(recipe: GlyphPretraining = GlyphPretraining()) -> dict[str, torch.Tensor]:
    """Train ``vit_digits`` to classify glyphs; return its state dict (without the glyph head)."""
    from timm.models.vision_transformer import VisionTransformer

    from promptcl.core.backbone import LOCAL_BACKBONES

    generator = torch.Generator().manual_seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    glyphs, labels = render_glyph_bank()
    model = VisionTransformer(**LOCAL_BACKBONES["vit_digits"], num_classes=len(GLYPHS))
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    warmup = max(1, recipe.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / recipe.steps)))
    model.train()
    for _ in range(recipe.steps):
        idx = torch.randint(len(labels), (recipe.batch_size,), generator=generator)
        images = augment_to_digits_format(glyphs[idx], generator)
        loss = F.cross_entropy(model(images), labels[idx], label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("head.")}


def cache_dir() -> Path:
    return Path(os.environ.get("PROMPTCL_CACHE", Path.home() / ".cache" / "promptcl"))


def digits_backbone_checkpoint(recipe: GlyphPretraining = GlyphPretraining()) -> Path:
    """Path of the glyph-pretrained ``vit_digits`` weights, made (once, under a lock) if missing."""
    from safetensors.torch import save_file

    path = cache_dir() / recipe.cache_name()
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent Ray workers wait for one maker
        if not path.is_file():
            state = pretrain_digits_backbone(recipe)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            save_file(state, str(tmp))
            os.replace(tmp, path)
    return path
