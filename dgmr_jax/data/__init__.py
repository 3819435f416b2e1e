"""Unlabeled-image input pipeline for distillation: sources, transforms, a per-host grain loader."""

from dgmr_jax.data.builtin import SKIMAGE_PHOTOS, LfwSubsetSource, Mnist5kSource, SkimagePhotosSource
from dgmr_jax.data.loader import SkipCounter, loader_state, make_loader, restore_loader, skipped_total
from dgmr_jax.data.sources import (
    IMAGE_EXTENSIONS,
    ArrayRecordSource,
    ImageFolderSource,
    TfdsSource,
    write_array_record,
)
from dgmr_jax.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DecodeOrSkip,
    EvalTransform,
    TrainTransform,
    decode_rgb,
    family_mean_std,
    normalize,
    random_resized_crop,
    random_resized_crop_box,
    resize_center_crop,
)

__all__ = [
    "SKIMAGE_PHOTOS",
    "LfwSubsetSource",
    "Mnist5kSource",
    "SkimagePhotosSource",
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "ArrayRecordSource",
    "DecodeOrSkip",
    "EvalTransform",
    "ImageFolderSource",
    "SkipCounter",
    "TfdsSource",
    "TrainTransform",
    "decode_rgb",
    "family_mean_std",
    "loader_state",
    "make_loader",
    "normalize",
    "random_resized_crop",
    "random_resized_crop_box",
    "resize_center_crop",
    "restore_loader",
    "skipped_total",
    "write_array_record",
]
