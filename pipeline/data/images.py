"""One image: bytes -> uint8 (size, size, channels), the same way for every source.

Photos arrive in any size, mode and orientation. Each is EXIF-rotated (phones store portrait
shots sideways plus a tag), converted to the configured channels (transparency composited on
black), its shorter side resized to `image_size` with antialiasing, then centre-cropped square:
nothing is stretched. Every failure is a DataError naming the file.
"""
from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# Bump when the pixels `transform` produces change: it keys the decoded-image cache.
TRANSFORM_VERSION = 1
RESAMPLE = Image.Resampling.BICUBIC  # antialiased when downsampling (Pillow widens the filter)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# What a corrupt or hostile file can raise from inside Pillow's decoders.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError, Image.DecompressionBombError)


@dataclass(frozen=True)
class Transform:
    image_size: int
    channels: int  # 1 or 3

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.image_size, self.image_size, self.channels

    @property
    def key(self) -> str:
        """Identifies the output pixels of this transform (cache key)."""
        return f"v{TRANSFORM_VERSION}-{self.image_size}px-{self.channels}ch"


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def probe(data: bytes, name: str) -> tuple[int, int, str]:
    """(width, height, mode) from the header alone: no pixel is decoded."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.width, img.height, img.mode
    except UnidentifiedImageError:
        raise DataError(f"{name}: not an image Pillow can read") from None
    except _DECODE_ERRORS as exc:
        raise DataError(f"{name}: unreadable or corrupt image ({exc})") from None


def decode(data: bytes, name: str, transform: Transform) -> np.ndarray:
    """Image file bytes -> uint8 transform.shape."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            # JPEG only: let libjpeg decode at 1/2..1/8 scale while keeping >= 2x the target size, so a
            # 12 MP photo costs a fraction of a full decode and the final resize still antialiases.
            img.draft(img.mode, (2 * transform.image_size, 2 * transform.image_size))
            img.load()  # decode fully: a truncated file fails here, not mid-training
            ImageOps.exif_transpose(img, in_place=True)
            return _to_array(img, transform)
    except UnidentifiedImageError:
        raise DataError(f"{name}: not an image Pillow can read") from None
    except _DECODE_ERRORS as exc:
        raise DataError(f"{name}: unreadable or corrupt image ({exc})") from None


def transform_array(pixels: np.ndarray, transform: Transform) -> np.ndarray:
    """An in-memory uint8 (H, W, 1|3) image through the same transform; identity when it already fits."""
    if pixels.shape == transform.shape:
        return pixels
    img = Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)
    return _to_array(img, transform)


def _to_array(img: Image.Image, transform: Transform) -> np.ndarray:
    img = _converted(img, transform.channels)
    size = transform.image_size
    if img.size != (size, size):
        img = ImageOps.fit(img, (size, size), method=RESAMPLE, centering=(0.5, 0.5))
    array = np.asarray(img, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def _converted(img: Image.Image, channels: int) -> Image.Image:
    target = "L" if channels == 1 else "RGB"
    if img.mode in _SIXTEEN_BIT:
        # 16-bit scans (PNG, TIFF): keep the top 8 bits; Pillow's own convert would clip instead.
        wide = np.asarray(img, dtype=np.uint32) >> 8
        img = Image.fromarray(np.clip(wide, 0, 255).astype(np.uint8))
    elif img.mode == "F":
        raise ValueError("floating-point pixels are not supported (need 8- or 16-bit images)")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        # Composite on black: what transparent pixels look like once the alpha channel is dropped.
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    return img if img.mode == target else img.convert(target)
