"""One image through the transform: real files written by Pillow, every mode, EXIF rotation, bad files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.images import Transform, decode, is_image_name, probe, transform_array
from pipeline.errors import DataError
from tests.conftest import write_photo


def _decode(path: Path, size: int = 16, channels: int = 3) -> np.ndarray:
    return decode(path.read_bytes(), str(path), Transform(size, channels))


@pytest.mark.parametrize("name, mode", [("a.png", "RGB"), ("b.png", "L"), ("c.png", "RGBA"), ("d.png", "P"),
                                        ("e.png", "LA"), ("f.jpg", "RGB"), ("g.jpeg", "L"), ("h.bmp", "RGB"),
                                        ("i.gif", "P"), ("j.webp", "RGB"), ("k.tif", "RGB"), ("l.TIFF", "1")])
@pytest.mark.parametrize("channels", [1, 3])
def test_every_mode_and_format_comes_out_square(tmp_path: Path, name: str, mode: str, channels: int):
    path = write_photo(tmp_path / name, size=(37, 23), mode=mode)
    assert probe(path.read_bytes(), name)[:2] == (37, 23)
    pixels = _decode(path, size=12, channels=channels)
    assert pixels.shape == (12, 12, channels) and pixels.dtype == np.uint8


def test_probe_reads_the_header_only(tmp_path: Path):
    path = write_photo(tmp_path / "x.jpg", size=(64, 48))
    truncated = path.read_bytes()[:len(path.read_bytes()) // 2]
    assert probe(truncated, "x.jpg") == (64, 48, "RGB")  # the header is intact; decoding would fail
    with pytest.raises(DataError, match="x.jpg: unreadable or corrupt image"):
        decode(truncated, "x.jpg", Transform(16, 3))


def test_not_an_image_is_named(tmp_path: Path):
    with pytest.raises(DataError, match="notes.png: not an image"):
        probe(b"just some text", "notes.png")
    with pytest.raises(DataError, match="notes.png: not an image"):
        decode(b"just some text", "notes.png", Transform(8, 1))


def test_shorter_side_resized_then_centre_cropped(tmp_path: Path):
    # 60x20: left third black, middle white, right third black. The centre crop keeps the middle.
    pixels = np.zeros((20, 60), dtype=np.uint8)
    pixels[:, 20:40] = 255
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    out = _decode(tmp_path / "wide.png", size=10, channels=1)
    assert out.shape == (10, 10, 1)
    assert out[:, 2:8].min() > 200  # nothing stretched: the centre square is the white band


def test_transparency_is_composited_on_black(tmp_path: Path):
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., :3] = 255  # white everywhere ...
    rgba[:, 8:, 3] = 255  # ... opaque on the right only
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    out = _decode(tmp_path / "alpha.png", size=16, channels=3)
    assert out[:, :6].max() == 0 and out[:, 10:].min() == 255
    gray = _decode(tmp_path / "alpha.png", size=16, channels=1)
    assert gray[:, :6].max() == 0 and gray[:, 10:].min() == 255


def test_palette_transparency_is_composited_on_black(tmp_path: Path):
    image = Image.new("P", (16, 16), 1)
    image.putpalette([255, 255, 255, 200, 200, 200] + [0] * 762)
    image.paste(0, (0, 0, 8, 16))
    image.save(tmp_path / "p.png", transparency=0)
    out = _decode(tmp_path / "p.png", size=16, channels=3)
    assert out[:, :6].max() == 0 and out[:, 10:].min() == 200


def test_exif_orientation_6_is_applied(tmp_path: Path):
    # Stored 40 wide x 20 tall, bright left half. Orientation 6 (camera turned): displayed rotated
    # 90 degrees clockwise, 20 wide x 40 tall, the bright half on top.
    stored = np.full((20, 40, 3), 20, dtype=np.uint8)
    stored[:, :20] = 235
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "turned.jpg", exif=exif, quality=95)
    Image.fromarray(stored).save(tmp_path / "plain.jpg", quality=95)
    turned = _decode(tmp_path / "turned.jpg", size=16, channels=1)[..., 0].astype(int)
    assert turned[:6].mean() > 200 and turned[-6:].mean() < 60  # bright top, dark bottom
    assert abs(turned[:, :8].mean() - turned[:, 8:].mean()) < 20
    plain = _decode(tmp_path / "plain.jpg", size=16, channels=1)[..., 0].astype(int)
    assert plain[:, :6].mean() > 200 and plain[:, -6:].mean() < 60  # without the tag: bright left


def test_large_jpeg_is_decoded_at_reduced_scale_deterministically(tmp_path: Path):
    path = write_photo(tmp_path / "big.jpg", size=(1600, 1200))
    first, second = _decode(path, size=32), _decode(path, size=32)
    assert first.shape == (32, 32, 3) and np.array_equal(first, second)


def test_sixteen_bit_images_keep_their_range(tmp_path: Path):
    deep = np.full((16, 16), 40000, dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    out = _decode(tmp_path / "deep.png", size=16, channels=1)
    assert int(out.min()) == int(out.max()) == 40000 >> 8


def test_in_memory_arrays_identity_when_they_fit():
    digit = np.arange(64, dtype=np.uint8).reshape(8, 8, 1)
    assert transform_array(digit, Transform(8, 1)) is digit
    bigger = transform_array(digit, Transform(16, 3))
    assert bigger.shape == (16, 16, 3) and np.array_equal(bigger[..., 0], bigger[..., 2])


def test_image_suffixes_case_insensitive():
    for name in ("a.png", "a.JPG", "b.jpeg", "c.Bmp", "d.gif", "e.webp", "f.tif", "g.TIFF"):
        assert is_image_name(name), name
    for name in ("notes.txt", "a.png.bak", "raw.cr2"):
        assert not is_image_name(name), name
