"""Per-example image transforms: decode (skipping unreadable records), crop, flip, normalize.

Crops follow torchvision's RandomResizedCrop / Resize + CenterCrop with PIL bicubic resizing,
so images match what the PyTorch recipes feed their models. Randomness comes from the numpy
Generator grain derives from (seed, global example index), so an example's augmentation does
not depend on the worker count or on where a run was resumed.
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image, ImageOps

from dgmr_jax.core.errors import UserError

_log = logging.getLogger(__name__)
_FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit (and 32-bit integer) single-channel images
_WHITE = (255, 255, 255, 255)
# The decompression-bomb guard: images with more pixels are not decoded. The default is the size Pillow refuses
# outright (2 x Image.MAX_IMAGE_PIXELS); the environment variable changes it for every decode in every process.
PIXELS_ENV = "DGMR_MAX_IMAGE_PIXELS"
DEFAULT_MAX_PIXELS = 178_956_970


def max_image_pixels() -> int:
    """The pixel limit of decode_rgb when none is given: $DGMR_MAX_IMAGE_PIXELS, else DEFAULT_MAX_PIXELS."""
    text = os.environ.get(PIXELS_ENV, "")
    if not text:
        return DEFAULT_MAX_PIXELS
    if not text.isdigit() or int(text) <= 0:
        raise UserError(f"{PIXELS_ENV}={text!r}: set it to a positive number of pixels, e.g. {DEFAULT_MAX_PIXELS}")
    return int(text)


def decode_rgb(data: bytes, max_pixels: int = 0) -> Image.Image:
    """Decode encoded image bytes to the 8-bit RGB picture a viewer shows (first frame of animations).

    EXIF orientation is applied (camera JPEGs store rotation as a tag), 16-bit images are scaled to 8 bits
    (PIL's own conversion clips them to white), and transparency is composited on white. The full decode
    happens here, so truncated files fail here rather than later. An image of more than `max_pixels` pixels
    (0: `max_image_pixels()`) is refused from its header, before its pixels are decoded. This is the guard:
    Pillow's own process-wide one is turned off, as it warns on every read and crop and cannot be raised per call.
    """
    limit = max_pixels or max_image_pixels()
    Image.MAX_IMAGE_PIXELS = None
    with Image.open(io.BytesIO(data)) as img:
        if img.width * img.height > limit:
            raise UserError(
                f"{img.width}x{img.height} is {img.width * img.height:,} pixels, over the limit of {limit:,}: raise "
                f"it with {PIXELS_ENV}=N (or a recipe's config.data.max_image_pixels) to read this image"
            )
        return to_rgb(ImageOps.exif_transpose(img))


def to_rgb(img: Image.Image) -> Image.Image:
    """`img` as 8-bit RGB: high-bit gray scaled by 1/257 (65535 -> 255), float gray as [0, 1] (or [0, 255] when
    it exceeds 1), palette, gray, CMYK and alpha images as they look (transparent pixels on white)."""
    if img.mode in _HIGH_BIT_MODES:
        img = Image.fromarray(np.clip(np.rint(np.asarray(img, np.float64) / 257), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        values = np.asarray(img, np.float64)
        scale = 255 if values.max(initial=0) <= 1 else 1
        img = Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        return Image.alpha_composite(Image.new("RGBA", img.size, _WHITE), img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


def random_resized_crop_box(
    width: int, height: int, scale: Sequence[float], ratio: Sequence[float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """torchvision `RandomResizedCrop.get_params`: (top, left, h, w) of a crop of the given area/aspect.

    10 tries to sample an area fraction in `scale` and a log-uniform aspect ratio in `ratio` that
    fits; otherwise the largest center crop whose aspect ratio is clamped into `ratio`.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(
    img: Image.Image,
    size: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    rng: np.random.Generator,
    interpolation: str = "bicubic",
) -> Image.Image:
    """Random crop (torchvision semantics) resized to size x size with PIL's `interpolation` filter."""
    top, left, h, w = random_resized_crop_box(img.width, img.height, scale, ratio, rng)
    return img.crop((left, top, left + w, top + h)).resize((size, size), _FILTERS[interpolation])


def resize_center_crop(
    img: Image.Image, size: int, resize_size: int | None = None, interpolation: str = "bicubic", square: bool = False
) -> Image.Image:
    """Eval view: resize the shorter side to `resize_size` (default `size`), center-crop size x size; `square`:
    resize straight to size x size, whatever the aspect (SigLIP's image processor)."""
    if square:
        return img.resize((size, size), _FILTERS[interpolation])
    resize_size = size if resize_size is None else resize_size
    if img.width <= img.height:
        new_w, new_h = resize_size, int(resize_size * img.height / img.width)
    else:
        new_w, new_h = int(resize_size * img.width / img.height), resize_size
    img = img.resize((new_w, new_h), _FILTERS[interpolation])
    top, left = round((new_h - size) / 2), round((new_w - size) / 2)
    return img.crop((left, top, left + size, top + size))


def normalize(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """RGB image -> float32 (H, W, 3) in [0, 1], then (x - mean) / std per channel."""
    x = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def record_name(source: Any, i: int) -> str:
    """How messages name record i: its path for file-backed sources, else its index."""
    return source.path(i) if hasattr(source, "path") else f"record {i}"


class DecodeOrSkip(grain.transforms.Map):
    """Record key -> {"image": PIL RGB, "index", "skipped", "record"}, passing over records that fail to read or
    decode (`max_pixels`: decode_rgb's limit).

    When record i fails, records i+1, i+2, ... (mod len) are tried in turn, so the replacement is deterministic
    and the batch shape stays fixed. "skipped" is the number of records passed over for this example, "record"
    the one decoded, "index" the sampled key i (so the records passed over run from "index" up to "record",
    wrapping around after the last). A record whose bytes do not decode (or are over the limit) is named in one
    warning and then passed over without being read again; a read that fails is tried again when sampled again.
    The loader feeds record keys instead of bytes precisely so that this transform can read the replacement
    records itself.
    """

    def __init__(self, source: Any, max_pixels: int = 0) -> None:
        self.source, self.max_pixels = source, max_pixels
        self.unreadable: set[int] = set()

    def map(self, key: int) -> dict[str, Any]:
        n = len(self.source)
        for skipped in range(n):
            i = (key + skipped) % n
            if i in self.unreadable:
                continue
            image = self._decode(i)
            if image is not None:
                return {"image": image, "index": np.int64(key), "skipped": np.int32(skipped), "record": np.int64(i)}
        raise UserError(f"none of the {n} records of {self.source!r} decodes as an image; check the data path")

    def _decode(self, i: int) -> Image.Image | None:
        """Record i as RGB, or None (warned) when it fails: any failure of one file must not stop training."""
        try:
            data = self.source[i]  # a failed read may be a passing storage error: tried again when sampled again
            try:
                return decode_rgb(data, self.max_pixels)
            except Exception:
                self.unreadable.add(i)  # bytes that do not decode (or are too large) never will
                raise
        except Exception as err:
            _log.warning("skipping unreadable image %s of %r: %s", record_name(self.source, i), self.source, err)
            return None


def passed_over(key: int, skipped: int, record: int) -> list[int]:
    """The records DecodeOrSkip passed over to fill a slot: from the sampled `key` up to the decoded `record`,
    wrapping around to record 0 after the source's last (then `record` < `key`)."""
    wrapped = record if record < key else 0
    return [*range(key, key + skipped - wrapped), *range(wrapped)]


def _with_images(element: dict[str, Any], images: np.ndarray) -> dict[str, Any]:
    """The loader's example layout: the PIL image replaced by the normalized array under "images"."""
    return {"images": images, **{k: element[k] for k in ("index", "skipped", "record")}}


class TrainTransform(grain.transforms.RandomMap):
    """Random resized crop, optional horizontal flip, normalize; image -> "images" float32 (H, W, 3)."""

    def __init__(
        self,
        size: int,
        *,
        scale: Sequence[float],
        ratio: Sequence[float],
        flip: bool,
        mean: Sequence[float],
        std: Sequence[float],
        interpolation: str = "bicubic",
    ) -> None:
        self.size, self.scale, self.ratio, self.flip, self.mean, self.std = size, scale, ratio, flip, mean, std
        self.interpolation = interpolation

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        img = random_resized_crop(element["image"], self.size, self.scale, self.ratio, rng, self.interpolation)
        if self.flip and rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return _with_images(element, normalize(img, self.mean, self.std))


class EvalTransform(grain.transforms.Map):
    """Resize shorter side, center crop (or `square`: resize to size x size), normalize; image -> "images" float32
    (H, W, 3)."""

    def __init__(
        self,
        size: int,
        *,
        resize_size: int | None = None,
        mean: Sequence[float],
        std: Sequence[float],
        interpolation: str = "bicubic",
        square: bool = False,
    ) -> None:
        self.size, self.resize_size, self.mean, self.std = size, resize_size, mean, std
        self.interpolation, self.square = interpolation, square

    def map(self, element: dict[str, Any]) -> dict[str, Any]:
        img = resize_center_crop(element["image"], self.size, self.resize_size, self.interpolation, self.square)
        return _with_images(element, normalize(img, self.mean, self.std))
