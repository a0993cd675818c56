"""`builtin:glyphs`: synthetic printed digits, rendered on the fly with Pillow's bundled font.

The default pretraining source. It is a different dataset from the handwritten target
(printed, synthetic, labelled by construction), so transfer from it is sim-to-real: no
label of a target image is ever used before fine-tuning. Random size, stroke width,
rotation, shear and position give the variety a font alone lacks.

The random draws of all glyphs are made first, in one seeded sequence (`glyph_params`), and
each glyph is rendered from its own draws (`render_glyph`): any process renders glyph i alone,
so a large corpus is never held in memory, and the pixels equal a sequential render's.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

GLYPHS = "0123456789"
CANVAS = 32  # render large, then box-downsample: anti-aliased strokes like scanned digits
FONT_SIZES = (22, 26, 30)
RENDERER = "glyphs-v1"  # part of each glyph's content id: bump when the rendering below changes


class GlyphParams(NamedTuple):
    """One glyph's random draws; with the output size they fix its pixels."""

    label: int
    font: int  # index into FONT_SIZES
    jitter: tuple[int, int]
    stroke: int
    angle: float
    shear: tuple[float, float, float]  # x scale, x shear, y scale
    width_fraction: float


def glyph_params(per_class: int, seed: int) -> list[GlyphParams]:
    """Draws of `per_class` glyphs of each digit, labels cycling 0..9. Deterministic from `seed`."""
    rng = np.random.default_rng(seed)
    params = []
    for index in range(per_class * len(GLYPHS)):
        font = int(rng.integers(len(FONT_SIZES)))
        jitter = tuple(int(j) for j in rng.integers(-2, 3, size=2))
        stroke = int(rng.integers(0, 3))
        angle = float(rng.uniform(-15, 15))
        # Drawn in the order the original sequential renderer drew them: the same seed, the same glyphs.
        x_scale = 1 + float(rng.uniform(-0.15, 0.15))
        x_shear = float(rng.uniform(-0.3, 0.3))
        y_scale = 1 + float(rng.uniform(-0.15, 0.15))
        width_fraction = float(rng.uniform(0.6, 0.8))
        params.append(GlyphParams(index % len(GLYPHS), font, jitter, stroke, angle, (x_scale, x_shear, y_scale),
                                  width_fraction))
    return params


@functools.lru_cache(maxsize=None)
def _font(index: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=FONT_SIZES[index])


def render_glyph(p: GlyphParams, height: int, width: int, channels: int = 1) -> np.ndarray:
    """-> uint8 (height, width, channels): the digit `p.label` drawn as `p` says."""
    img = Image.new("L", (CANVAS, CANVAS), 0)
    ImageDraw.Draw(img).text((CANVAS // 2 + p.jitter[0], CANVAS // 2 + p.jitter[1]), GLYPHS[p.label], fill=255,
                             font=_font(p.font), anchor="mm", stroke_width=p.stroke, stroke_fill=255)
    img = img.rotate(p.angle, resample=Image.BILINEAR)
    img = img.transform((CANVAS, CANVAS), Image.AFFINE, (p.shear[0], p.shear[1], 0, 0, p.shear[2], 0),
                        resample=Image.BILINEAR)
    glyph = img.crop(img.getbbox() or (0, 0, CANVAS, CANVAS))
    glyph_width = max(1, int(round(width * p.width_fraction)))
    glyph = glyph.resize((glyph_width, height), Image.BOX)
    canvas = Image.new("L", (width, height), 0)
    canvas.paste(glyph, ((width - glyph_width) // 2, 0))
    array = np.asarray(canvas, dtype=np.float64)
    gray = np.round(array / max(array.max(), 1.0) * 255).astype(np.uint8)
    return np.repeat(gray[..., None], channels, axis=2)


def render_glyphs(per_class: int, image_shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (images uint8 (N, H, W, C), labels int64), matching the target's (C, H, W) shape. All in memory:
    for benchmarks and small demos; the `corpus` stage renders one glyph at a time instead."""
    channels, height, width = image_shape
    params = glyph_params(per_class, seed)
    images = np.stack([render_glyph(p, height, width, channels) for p in params])
    return images, np.asarray([p.label for p in params], dtype=np.int64)
