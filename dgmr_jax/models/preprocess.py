"""How a model's pretrained weights expect their images: mean/std, eval crop and resize filter.

The settings are published with each architecture's weights (timm's `pretrained_cfg`, open_clip's
preprocess config, EVA-CLIP's and InternViT's image processors). `dgmr-jax convert` writes them into the
model directory's meta; every later stage (distill, eval, Taylor scoring, the demo) reads them from there.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from dgmr_jax.core.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)  # timm's AugReg ViTs: inputs scaled to [-1, 1]
INTERPOLATIONS = ("bicubic", "bilinear")
# shorter: resize the shorter side, center-crop (timm, open_clip); square: resize straight to img_size x img_size,
# whatever the aspect, no crop (SigLIP's image processor)
RESIZES = ("shorter", "square")


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Per-channel mean/std; eval view = resize the shorter side to floor(size / crop_pct), center-crop size, or
    (resize="square") resize straight to size x size."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float = 1.0
    interpolation: str = "bicubic"
    resize: str = "shorter"

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.mean) != 3 or len(self.std) != 3:
            raise UserError(f"mean and std need 3 channel values each, got {self.mean} and {self.std}")
        if not all(math.isfinite(v) for v in self.mean) or not all(math.isfinite(v) and v > 0 for v in self.std):
            raise UserError(f"mean must be finite and std finite and > 0, got {self.mean} and {self.std}")
        if not 0 < self.crop_pct <= 1:
            raise UserError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.interpolation not in INTERPOLATIONS:
            raise UserError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if self.resize not in RESIZES:
            raise UserError(f"resize must be one of {RESIZES}, got {self.resize!r}")
        if self.resize == "square" and self.crop_pct != 1:
            raise UserError(f"resize 'square' crops nothing, so crop_pct must be 1, got {self.crop_pct}")

    def resize_size(self, img_size: int) -> int:
        """Shorter side before the eval center crop (timm: floor(img_size / crop_pct))."""
        return math.floor(img_size / self.crop_pct)

    def eval_view(self, img_size: int) -> dict[str, Any]:
        """Keyword arguments of the eval transforms (EvalBatches, make_loader(train=False)) at img_size."""
        return dict(
            mean=self.mean,
            std=self.std,
            resize_size=self.resize_size(img_size),
            interpolation=self.interpolation,
            square=self.resize == "square",
        )

    def to_meta(self, img_size: int) -> dict[str, Any]:
        """What a model directory's meta records under "preprocess" ("resize" only when square, so directories
        written before it existed read the same)."""
        meta = {**dataclasses.asdict(self), "mean": list(self.mean), "std": list(self.std), "img_size": img_size}
        return meta if self.resize == "square" else {k: v for k, v in meta.items() if k != "resize"}

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], name: str = "") -> Preprocess:
        """The settings a model directory's meta records; older directories without them fall back to the
        published settings of their architecture `name` (a preset)."""
        stored = meta.get("preprocess")
        if stored:
            return cls(**{k: v for k, v in stored.items() if k != "img_size"})
        return published(name, hint="the model directory records no preprocessing")

    def replace(self, **changes: Any) -> Preprocess:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


_IMAGENET = Preprocess(IMAGENET_MEAN, IMAGENET_STD)
_CLIP = Preprocess(CLIP_MEAN, CLIP_STD)
_AUGREG = Preprocess(HALF, HALF, crop_pct=0.9)
_DEIT = Preprocess(IMAGENET_MEAN, IMAGENET_STD, crop_pct=0.9)
_EVA02 = Preprocess(CLIP_MEAN, CLIP_STD, crop_pct=0.9)
_SIGLIP = Preprocess(HALF, HALF, resize="square")

# Published settings of each preset's default pretrained weights: timm's pretrained_cfg of the default tag,
# open_clip's preprocess config (resize the shorter side to the input size: crop_pct 1), EVA-CLIP's
# (OpenAI CLIP statistics, bicubic, no crop margin) and InternViT's image processor (ImageNet, bicubic).
PUBLISHED: dict[str, Preprocess] = {
    "vit_tiny_patch16_224": _AUGREG,
    "vit_small_patch16_224": _AUGREG,
    "vit_base_patch16_224": _AUGREG,
    "vit_large_patch16_224": _AUGREG,
    "vit_base_patch16_clip_224": Preprocess(CLIP_MEAN, CLIP_STD, crop_pct=0.95),
    "deit_tiny_patch16_224": _DEIT,
    "deit_small_patch16_224": _DEIT,
    "deit_base_patch16_224": _DEIT,
    "deit_small_distilled_patch16_224": _DEIT,
    "vit_small_patch14_dinov2": _IMAGENET,
    "vit_base_patch14_dinov2": _IMAGENET,
    "vit_large_patch14_dinov2": _IMAGENET,
    "vit_small_patch14_reg4_dinov2": _IMAGENET,
    "vit_giant_patch14_dinov2": _IMAGENET,
    "eva02_small_patch14_224": _EVA02,
    "eva02_base_patch14_224": _EVA02,
    "eva02_large_patch14_224": _EVA02,
    "eva_giant_patch14_clip_224": _EVA02,
    "eva02_enormous_patch14_clip_224": _EVA02,
    "ViT-B-32": _CLIP,
    "ViT-B-16": _CLIP,
    "ViT-L-14": _CLIP,
    "ViT-g-14": _CLIP,
    "ViT-bigG-14": _CLIP,
    "EVA-CLIP-8B": _CLIP,
    "EVA-CLIP-8B-448": _CLIP,
    "EVA-CLIP-18B": _CLIP,
    # InternVL resizes straight to the square input; on square images that is crop_pct 1
    "InternViT-6B-448px-V2_5": _IMAGENET,
    "InternViT-300M-448px-V2_5": _IMAGENET,
    # SiglipImageProcessor: resize straight to the square input (bicubic, no crop), then (x - 0.5) / 0.5
    "siglip-base-patch16-224": _SIGLIP,
    "siglip-so400m-patch14-384": _SIGLIP,
    "siglip2-so400m-patch14-384": _SIGLIP,
    "vit_base_patch16_siglip_224": _AUGREG,  # timm's pretrained_cfg of its siglip models: the default crop of 0.9
    "vit_so400m_patch14_siglip_384": _AUGREG,
}


def published(name: str, hint: str = "") -> Preprocess:
    """The published preprocessing of preset `name`; a ValueError naming --mean/--std for anything else."""
    if name not in PUBLISHED:
        why = f"{hint}; " if hint else ""
        raise UserError(
            f"{why}no published preprocessing is known for architecture {name!r}: give it to `dgmr-jax convert` "
            "with --mean R,G,B --std R,G,B (and --crop-pct, --interpolation if they differ from 1.0, bicubic)"
        )
    return PUBLISHED[name]


def parse_triple(text: str | None, flag: str) -> tuple[float, ...] | None:
    """'0.5,0.5,0.5' -> (0.5, 0.5, 0.5) for the --mean / --std flags; None stays None."""
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError as err:
        raise UserError(f"{flag} takes three comma-separated numbers (R,G,B), got {text!r}") from err
    if len(values) != 3:
        raise UserError(f"{flag} takes three comma-separated numbers (R,G,B), got {text!r}")
    return values


def for_model(
    name: str, mean: Sequence[float] | None = None, std: Sequence[float] | None = None, **changes: Any
) -> Preprocess:
    """Published settings of `name` with overrides; with both mean and std given, `name` need not be a preset."""
    if mean is not None and std is not None and name not in PUBLISHED:
        return Preprocess(mean, std).replace(**changes)
    return published(name).replace(mean=mean, std=std, **changes)
