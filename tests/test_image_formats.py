"""Images as people have them decode to the picture they show: 16-bit, gray, palette, alpha, CMYK, EXIF-rotated.

Each variant is checked against an 8-bit RGB twin of the same picture, at the decoder and through the training
loader (the path distill, eval, Taylor scoring and the text stage share).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dgmr_jax.data import decode_rgb, make_loader


def _picture(h: int = 40, w: int = 56) -> np.ndarray:
    """A smooth RGB picture with edges (uint8)."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (h + w - 2)], axis=-1)
    img[10:20, 15:30] = (200, 30, 90)
    return img.astype(np.uint8)


def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _gray16() -> tuple[bytes, np.ndarray]:
    gray = _picture()[..., 1]
    wide = Image.fromarray(gray.astype(np.uint16) * 257)  # the full 16-bit range: 255 -> 65535
    assert wide.mode.startswith("I;16")
    return _encode(wide), np.repeat(gray[..., None], 3, axis=-1)


def _gray() -> tuple[bytes, np.ndarray]:
    gray = _picture()[..., 0]
    return _encode(Image.fromarray(gray, "L")), np.repeat(gray[..., None], 3, axis=-1)


def _palette() -> tuple[bytes, np.ndarray]:
    pal = Image.fromarray(_picture()).quantize(64)
    return _encode(pal), np.asarray(pal.convert("RGB"))


def _rgba() -> tuple[bytes, np.ndarray]:
    rgb = _picture()
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[:, :20] = 0  # transparent: whatever colour is stored there must not show
    alpha[:, 20:30] = 128
    stored = rgb.copy()
    stored[:, :20] = 0
    a = alpha[..., None].astype(np.float64) / 255
    twin = np.rint(stored * a + 255 * (1 - a)).astype(np.uint8)  # on white
    return _encode(Image.fromarray(np.dstack([stored, alpha]), "RGBA")), twin


def _float_gray() -> tuple[bytes, np.ndarray]:
    gray = _picture()[..., 2]
    return _encode(Image.fromarray(gray.astype(np.float32) / 255, "F"), "TIFF"), np.repeat(gray[..., None], 3, -1)


VARIANTS = {"16-bit gray PNG": _gray16, "gray": _gray, "palette": _palette, "RGBA": _rgba, "float TIFF": _float_gray}


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_decodes_to_its_8bit_rgb_twin(name):
    data, twin = VARIANTS[name]()
    decoded = np.asarray(decode_rgb(data))
    assert decoded.dtype == np.uint8 and decoded.shape == twin.shape
    assert np.abs(decoded.astype(int) - twin).max() <= 1, name


def test_16bit_png_is_not_white():
    data, twin = _gray16()
    assert (np.asarray(decode_rgb(data)) == 255).mean() < 0.05  # was 99.7% white through convert("RGB")
    assert (twin == 255).mean() < 0.05


def test_exif_rotated_jpeg_shows_upright():
    upright = _picture()
    stored = np.ascontiguousarray(np.rot90(upright, k=1))  # the sensor's layout: turned 90 degrees counter-clockwise
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: rotate 90 CW to display
    tagged = _encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif)
    plain = np.asarray(decode_rgb(_encode(Image.fromarray(stored), "JPEG", quality=95)))
    decoded = np.asarray(decode_rgb(tagged))
    assert decoded.shape == upright.shape
    np.testing.assert_array_equal(decoded, np.rot90(plain, k=-1))  # the same pixels, turned upright exactly


def test_cmyk_jpeg_looks_like_its_rgb_twin():
    rgb = Image.fromarray(_picture())
    cmyk = np.asarray(decode_rgb(_encode(rgb.convert("CMYK"), "JPEG", quality=100))).astype(int)
    twin = np.asarray(decode_rgb(_encode(rgb, "JPEG", quality=100))).astype(int)
    assert np.abs(cmyk - twin).mean() < 3


class _Bytes:
    """A grain source of encoded images."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_the_loader_feeds_every_variant_as_its_twin():
    variants = [VARIANTS[name]() for name in VARIANTS]
    odd = _Bytes([data for data, _ in variants])
    twins = _Bytes([_encode(Image.fromarray(twin)) for _, twin in variants])

    def first_batch(source):
        loader = make_loader(
            source, batch_size=len(VARIANTS), img_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, train=False
        )
        return next(iter(loader))["images"]

    # in source order, resized and center-cropped alike; one 8-bit level is 2/255 after normalizing by 0.5
    np.testing.assert_allclose(first_batch(odd), first_batch(twins), atol=2 * 2 / 255)
