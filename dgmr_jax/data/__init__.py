"""Image input: one spec parser (open_images), sources, transforms, a per-host grain loader."""

from dgmr_jax.data.builtin import SKIMAGE_PHOTOS, LfwSubsetSource, Mnist5kSource, SkimagePhotosSource
from dgmr_jax.data.loader import SkipCounter, loader_state, make_loader, restore_loader, skipped_total
from dgmr_jax.data.open import KINDS, Images, open_images
from dgmr_jax.data.sources import (
    IMAGE_EXTENSIONS,
    ArrayRecordSource,
    ImageFolderSource,
    TfdsSource,
    write_array_record,
)
from dgmr_jax.data.transforms import (
    DecodeOrSkip,
    EvalTransform,
    TrainTransform,
    decode_rgb,
    normalize,
    random_resized_crop,
    random_resized_crop_box,
    record_name,
    resize_center_crop,
)

__all__ = [
    "KINDS",
    "SKIMAGE_PHOTOS",
    "LfwSubsetSource",
    "Mnist5kSource",
    "SkimagePhotosSource",
    "IMAGE_EXTENSIONS",
    "ArrayRecordSource",
    "DecodeOrSkip",
    "EvalTransform",
    "ImageFolderSource",
    "Images",
    "SkipCounter",
    "TfdsSource",
    "TrainTransform",
    "decode_rgb",
    "record_name",
    "loader_state",
    "make_loader",
    "normalize",
    "open_images",
    "random_resized_crop",
    "random_resized_crop_box",
    "resize_center_crop",
    "restore_loader",
    "skipped_total",
    "write_array_record",
]
