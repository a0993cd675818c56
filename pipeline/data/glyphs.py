"""`builtin:glyphs`: synthetic printed digits, rendered on the fly with Pillow's bundled font.

The default pretraining source. It is a different dataset from the handwritten target
(printed, synthetic, labelled by construction), so transfer from it is sim-to-real: no
label of a target image is ever used before fine-tuning. Random size, stroke width,
rotation, shear and position give the variety a font alone lacks.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

GLYPHS = "0123456789"
CANVAS = 32  # render large, then box-downsample: anti-aliased strokes like scanned digits


def _render(char: str, font: ImageFont.FreeTypeFont, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    img = Image.new("L", (CANVAS, CANVAS), 0)
    jitter = rng.integers(-2, 3, size=2)
    ImageDraw.Draw(img).text((CANVAS // 2 + jitter[0], CANVAS // 2 + jitter[1]), char, fill=255, font=font,
                             anchor="mm", stroke_width=int(rng.integers(0, 3)), stroke_fill=255)
    img = img.rotate(rng.uniform(-15, 15), resample=Image.BILINEAR)
    shear = (1 + rng.uniform(-0.15, 0.15), rng.uniform(-0.3, 0.3), 0, 0, 1 + rng.uniform(-0.15, 0.15), 0)
    img = img.transform((CANVAS, CANVAS), Image.AFFINE, shear, resample=Image.BILINEAR)
    glyph = img.crop(img.getbbox() or (0, 0, CANVAS, CANVAS))
    glyph_width = max(1, int(round(width * rng.uniform(0.6, 0.8))))
    glyph = glyph.resize((glyph_width, height), Image.BOX)
    canvas = Image.new("L", (width, height), 0)
    canvas.paste(glyph, ((width - glyph_width) // 2, 0))
    array = np.asarray(canvas, dtype=np.float64)
    return np.round(array / max(array.max(), 1.0) * 255).astype(np.uint8)


def render_glyphs(per_class: int, image_shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (images uint8 (N, H, W, C), labels int64), matching the target's (C, H, W) shape."""
    channels, height, width = image_shape
    rng = np.random.default_rng(seed)
    fonts = [ImageFont.load_default(size=size) for size in (22, 26, 30)]
    images, labels = [], []
    for index in range(per_class * len(GLYPHS)):
        label = index % len(GLYPHS)
        images.append(_render(GLYPHS[label], fonts[rng.integers(len(fonts))], rng, height, width))
        labels.append(label)
    stacked = np.repeat(np.stack(images)[..., None], channels, axis=3)
    return stacked, np.asarray(labels, dtype=np.int64)
