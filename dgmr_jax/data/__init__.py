"""Image input: one spec parser (open_images), sources, transforms, a per-host grain loader, eval batches, and
the one reader of image-caption jsonl manifests."""

from dgmr_jax.data.builtin import SKIMAGE_PHOTOS, LfwSubsetSource, Mnist5kSource, SkimagePhotosSource
from dgmr_jax.data.eval_batches import EvalBatches, decoded_once
from dgmr_jax.data.loader import SkipCounter, loader_state, make_loader, restore_loader, skipped_total
from dgmr_jax.data.manifests import BadPair, Pairs, read_manifest, require_good, warn_bad
from dgmr_jax.data.open import KINDS, Images, open_images
from dgmr_jax.data.sources import (
    IMAGE_EXTENSIONS,
    ArrayRecordSource,
    ImageFiles,
    ImageFolderSource,
    Subset,
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
    "BadPair",
    "DecodeOrSkip",
    "EvalBatches",
    "EvalTransform",
    "ImageFiles",
    "ImageFolderSource",
    "Images",
    "Pairs",
    "SkipCounter",
    "Subset",
    "TfdsSource",
    "TrainTransform",
    "decode_rgb",
    "decoded_once",
    "record_name",
    "loader_state",
    "make_loader",
    "normalize",
    "open_images",
    "random_resized_crop",
    "read_manifest",
    "require_good",
    "random_resized_crop_box",
    "resize_center_crop",
    "restore_loader",
    "skipped_total",
    "warn_bad",
    "write_array_record",
]
