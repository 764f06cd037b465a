"""Glyphs rendered from real fonts: pretraining data for the offline backbones, and the letters benchmark.

Rendering is deterministic (Pillow, fixed sizes); augmentation is batched torch driven by an explicit
generator, so a seed fixes every image.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

# Debian font packages the 28-px glyph pretraining renders from, each with one file it installs
# under /usr/share/fonts; every .ttf/.otf in their directories is used, so all must be present.
PRETRAINING_FONT_PACKAGES = (
    ("fonts-dejavu-core", "truetype/dejavu/DejaVuSans.ttf"),
    ("fonts-dejavu-extra", "truetype/dejavu/DejaVuSansCondensed.ttf"),
    ("fonts-liberation", "truetype/liberation/LiberationSans-Regular.ttf"),
    ("fonts-freefont-ttf", "truetype/freefont/FreeSans.ttf"),
    ("fonts-crosextra-carlito", "truetype/crosextra/Carlito-Regular.ttf"),
    ("fonts-crosextra-caladea", "truetype/crosextra/Caladea-Regular.ttf"),
    ("fonts-urw-base35", "opentype/urw-base35/NimbusSans-Regular.otf"),
    ("fonts-linuxlibertine", "opentype/linux-libertine/LinLibertine_R.otf"),
)
FONT_ROOT = Path("/usr/share/fonts")

# Pretraining classes for backbones that serve digit and A-J letter tasks: no digits, none of the
# letters A-J in either case, and nothing that can pass for a digit (O/0, l/1, S/5, Z/2, b/6, q/9,
# Greek theta, Cyrillic Ze/Che/Be, infinity ...) or for A-J (the forall, exists and subset signs),
# and of letters drawn alike in two scripts only one.
PRETRAINING_GLYPHS = (
    "KLMNPQRTUVWXY" "kmnprtuvwxy"
    "ΓΔΛΞΠΣΦΨΩ" "αγεζηκλμξπστφψω"
    "ДЖИЦШЩЪЫЬЮЯ" "джилцшщъыьюя"
    "@#%&¶®±÷≈≠≤≥←→↑↓↔★☆♠♣♥♦■▲△▼◆◇⊕⊗∇√£¥ÞþŁ¤"
)
MIN_FONTS_PER_GLYPH = 6  # a class most fonts lack would be learned from a handful of images

LETTERS = "ABCDEFGHIJ"  # the notMNIST-style letters benchmark


def matplotlib_font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf"


def pretraining_fonts() -> list[Path]:
    """Every font file of the pretraining packages, sorted; a missing package is a clear error."""
    missing = [package for package, marker in PRETRAINING_FONT_PACKAGES if not (FONT_ROOT / marker).is_file()]
    if missing:
        raise ValueError(f"glyph pretraining needs the Debian font packages {', '.join(missing)}: "
                         f"apt-get install {' '.join(p for p, _ in PRETRAINING_FONT_PACKAGES)}")
    dirs = dict.fromkeys((FONT_ROOT / marker).parent for _, marker in PRETRAINING_FONT_PACKAGES)  # in order
    return [p for d in dirs for p in sorted(d.glob("*")) if p.suffix in (".ttf", ".otf")]


def letter_fonts() -> list[Path]:
    """matplotlib's bundled text fonts (installed with the project) that draw every letter A-J."""
    names = ("DejaVuSans", "DejaVuSans-Bold", "DejaVuSans-Oblique", "DejaVuSans-BoldOblique",
             "DejaVuSansMono", "DejaVuSansMono-Bold", "DejaVuSansMono-Oblique", "DejaVuSansMono-BoldOblique",
             "DejaVuSerif", "DejaVuSerif-Bold", "DejaVuSerif-Italic", "DejaVuSerif-BoldItalic",
             "STIXGeneral", "STIXGeneralBol", "STIXGeneralItalic", "STIXGeneralBolIta",
             "cmr10", "cmss10", "cmb10", "cmtt10", "cmti10")
    return [matplotlib_font_dir() / f"{name}.ttf" for name in names]


def font_covers(font: Path, chars: str) -> set[str]:
    """The characters of ``chars`` the font really draws (from its cmap, so no missing-glyph boxes)."""
    from fontTools.ttLib import TTFont

    cmap = TTFont(str(font), lazy=True).getBestCmap() or {}
    return {c for c in chars if ord(c) in cmap}


def render_glyphs(
    chars: str,
    fonts: Sequence[Path],
    *,
    frame: int,
    box: int,
    stroke_widths: Sequence[int] = (0,),
    min_fonts: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each char in each font that has it and each stroke width: ``[n, 1, frame, frame]`` ink in [0, 1].

    A glyph is drawn at 64 px, cropped to its ink and scaled to fit a ``box`` square centred in the
    frame. Returns images, class labels (index into ``chars``) and font indices. Chars found in fewer
    than ``min_fonts`` fonts are dropped (their label stays reserved)."""
    from PIL import Image, ImageDraw, ImageFont

    coverage = [font_covers(f, chars) if f.suffix in (".ttf", ".otf") else set(chars) for f in fonts]
    kept = {c for c in chars if sum(c in cov for cov in coverage) >= min_fonts}
    images, labels, font_ids = [], [], []
    for font_id, (path, covered) in enumerate(zip(fonts, coverage)):
        font = ImageFont.truetype(str(path), 64)
        for label, char in enumerate(chars):
            if char not in kept or char not in covered:
                continue
            for stroke in stroke_widths:
                canvas = Image.new("L", (128, 128), 0)
                ImageDraw.Draw(canvas).text((20, 10), char, fill=255, font=font,
                                            stroke_width=stroke, stroke_fill=255)
                bbox = canvas.getbbox()
                if bbox is None:
                    continue
                glyph = canvas.crop(bbox)
                scale = box / max(glyph.size)
                size = (max(1, round(glyph.size[0] * scale)), max(1, round(glyph.size[1] * scale)))
                glyph = glyph.resize(size, Image.BILINEAR)
                canvas = Image.new("L", (frame, frame), 0)
                canvas.paste(glyph, ((frame - size[0]) // 2, (frame - size[1]) // 2))
                images.append(np.asarray(canvas, dtype=np.float32) / 255.0)
                labels.append(label)
                font_ids.append(font_id)
    if not images:
        raise ValueError(f"none of the {len(fonts)} fonts draws any of {chars!r}")
    return torch.tensor(np.stack(images))[:, None], torch.tensor(labels), torch.tensor(font_ids)


def tensor_digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def random_affine(x: torch.Tensor, generator: torch.Generator, *, rotation: float, zoom: tuple[float, float],
                  aspect: float, shear: float, shift: float) -> torch.Tensor:
    """Per-image rotation (radians), zoom, aspect (log-scale), shear and shift (fraction of the frame)."""
    n = x.shape[0]

    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    angle = uniform(-rotation, rotation)
    scale = uniform(*zoom)
    stretch = torch.exp(uniform(-aspect, aspect))
    skew = uniform(-shear, shear)
    offset = torch.stack([uniform(-2 * shift, 2 * shift), uniform(-2 * shift, 2 * shift)], dim=1)
    # affine_grid maps output to input coordinates, so the inverse zoom/stretch goes in theta.
    sx, sy = 1 / (scale * stretch), stretch / scale
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos * sx, (-sin + skew) * sx, offset[:, 0]], 1),
                         torch.stack([sin * sy, cos * sy, offset[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)


def jitter_strokes(x: torch.Tensor, generator: torch.Generator, *, dilate: float, erode: float) -> torch.Tensor:
    roll = torch.rand(x.shape[0], generator=generator)[:, None, None, None]
    thicker = F.max_pool2d(x, 3, 1, 1)
    thinner = -F.max_pool2d(-x, 3, 1, 1)
    return torch.where(roll < dilate, thicker, torch.where(roll > 1 - erode, thinner, x))


def augment_glyphs(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The pretraining augmentation of 28-px glyphs (see ../shared/reference/glyph_pretrain.md): affine,
    stroke, blur, intensity and noise jitter; ink in [0, 1] in, [0, 1] out."""
    n = x.shape[0]
    x = random_affine(x, generator, rotation=math.radians(20), zoom=(0.75, 1.4), aspect=0.25, shear=0.3,
                      shift=0.15)
    x = jitter_strokes(x, generator, dilate=0.2, erode=0.15)
    blur = torch.rand(n, generator=generator)[:, None, None, None] < 0.3
    x = torch.where(blur, F.avg_pool2d(x, 3, 1, 1, count_include_pad=False), x)
    x = x * (0.6 + 0.4 * torch.rand(n, 1, 1, 1, generator=generator))
    noisy = torch.rand(n, generator=generator)[:, None, None, None] < 0.3
    x = x + noisy * 0.05 * torch.randn(x.shape, generator=generator)
    return x.clamp(0, 1)
