"""Random-access sources of encoded images: an image folder, ArrayRecord files, a local TFDS dataset.

Each source has `__len__` and `__getitem__(i) -> bytes` (the encoded image, never decoded here) so
grain can read it from any worker, and a stable `repr` that grain stores in the iterator state
to refuse resuming on a different dataset. Labels are ignored: distillation needs images only.
Decoding, and skipping what does not decode, happens in `transforms.DecodeOrSkip`.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Sequence
from typing import Any

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from dgmr_jax.core.errors import UserError
from dgmr_jax.core.paths import as_path, is_uri

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class ImageFolderSource:
    """Every image file under `root`, at any depth, in sorted relative-path order.

    Sorting makes record i the same file on every host and every run. Files whose extension is
    not in `IMAGE_EXTENSIONS` (case-insensitive) are not records; their number is `ignored_files`.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = str(as_path(root))
        if not as_path(self.root).is_dir():
            raise UserError(f"image folder {self.root!r} does not exist or is not a directory")
        relpaths, ignored = [], 0
        for dirpath, filenames in walk_files(self.root):
            for filename in filenames:
                if filename.lower().endswith(IMAGE_EXTENSIONS):
                    relpaths.append(os.path.relpath(os.path.join(dirpath, filename), self.root))
                else:
                    ignored += 1
        if not relpaths:
            raise UserError(
                f"no image files found under {self.root!r} ({ignored} other files); accepted extensions "
                f"(case-insensitive): {' '.join(IMAGE_EXTENSIONS)}"
            )
        self.relpaths = sorted(relpaths)
        self.ignored_files = ignored

    def __len__(self) -> int:
        return len(self.relpaths)

    def __getitem__(self, i: int) -> bytes:
        return as_path(self.path(i)).read_bytes()

    def path(self, i: int) -> str:
        """Absolute path (or URI) of record i (for log messages about unreadable files)."""
        return os.path.join(self.root, self.relpaths[i])

    def __repr__(self) -> str:
        return f"ImageFolderSource(root={self.root!r}, num_images={len(self)})"


class ImageFiles:
    """Image files by path (local or gs://, as listed by a manifest or a folder walk), in the given order."""

    def __init__(self, paths: Sequence[str], listed_in: str) -> None:
        self.paths, self.listed_in = list(paths), listed_in

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> bytes:
        return as_path(self.paths[i]).read_bytes()

    def path(self, i: int) -> str:
        """Path of record i (named in the messages about unreadable images)."""
        return self.paths[i]

    def __repr__(self) -> str:
        return f"ImageFiles(listed_in={self.listed_in!r}, num_images={len(self)})"


class Subset:
    """Records `keep` of a source, renumbered (named as the source names them)."""

    def __init__(self, source: Any, keep: Sequence[int]) -> None:
        self.source, self.keep = source, list(keep)

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, i: int) -> bytes:
        return self.source[self.keep[i]]

    def path(self, i: int) -> str:
        return self.source.path(self.keep[i]) if hasattr(self.source, "path") else f"record {self.keep[i]}"

    def __repr__(self) -> str:
        return f"Subset({self.source!r}, num_images={len(self)})"


def walk_files(root: str) -> Iterable[tuple[str, list[str]]]:
    """(folder, file names) under `root` at any depth, folders in sorted order. Local folders follow symlinks
    but visit each real folder once (a link loop or a second link would repeat records); gs:// and other
    URIs are listed through epath."""
    if is_uri(root):
        scheme = root.split("://", 1)[0] + "://"
        for dirpath, _, filenames in as_path(root).walk():
            folder = str(dirpath)  # gcsfs lists folders without the gs:// it was given
            yield (folder if is_uri(folder) else scheme + folder.lstrip("/")), list(filenames)
        return
    seen = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        if os.path.realpath(dirpath) in seen:
            dirnames.clear()
            continue
        seen.add(os.path.realpath(dirpath))
        dirnames.sort()  # visit in sorted order so the copy kept among duplicates is the same everywhere
        yield dirpath, filenames


def _expand(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expand glob patterns (sorted) and check that every file exists; the files as absolute paths or URIs (a
    run records them: the same files typed from another folder are the same inputs)."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    files = []
    for pattern in map(os.fspath, paths):
        if not glob.has_magic(pattern):
            matches = [pattern]
        elif is_uri(pattern):  # gs://bucket/dir/train-*.array_record: the pattern in the last part only
            matches = sorted(str(p) for p in as_path(pattern).parent.glob(as_path(pattern).name))
        else:
            matches = sorted(glob.glob(pattern))
        missing = [m for m in matches if not as_path(m).is_file()]
        if not matches or missing:
            raise UserError(f"ArrayRecord path {pattern!r} matches no file ({missing or 'empty glob'})")
        files.extend(str(as_path(m)) for m in matches)
    return files


def _check_each(paths: Sequence[str]) -> None:
    """Name the first ArrayRecord file that cannot be opened (the reader's own error names none)."""
    for path in paths:
        try:
            ArrayRecordReader(path).close()
        except RuntimeError as err:
            why = " ".join(str(err).split()) or "no readable footer"
            raise UserError(
                f"ArrayRecord file {path} is truncated or damaged ({as_path(path).stat().length} bytes: {why}); "
                "write or copy it again"
            ) from None


class ArrayRecordSource:
    """Records of ArrayRecord files (paths or glob patterns), each record one encoded image."""

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike]) -> None:
        self.paths = _expand(paths)
        try:  # opening counts each file's records, which reads its footer: a truncated file fails here
            self._source = grain.sources.ArrayRecordDataSource(self.paths)
        except RuntimeError:
            _check_each(self.paths)
            raise
        if len(self._source) == 0:
            raise UserError(f"ArrayRecord files {self.paths} hold no records")

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> bytes:
        return self._source[i]

    def __repr__(self) -> str:
        return f"ArrayRecordSource(paths={self.paths!r}, num_records={len(self)})"


def write_array_record(path: str | os.PathLike, encoded_images: Iterable[bytes]) -> int:
    """Write encoded images as one local ArrayRecord file (group_size 1: cheap random access); return the count.
    ArrayRecord reads gs:// but writes only local files: copy shards up afterwards (docs/pod.md)."""
    if is_uri(path):
        raise UserError(
            f"{path}: ArrayRecord files are written to a local disk; write the shards here, then copy them up "
            "(gcloud storage cp DIR/*.array_record gs://BUCKET/DIR/)"
        )
    writer = ArrayRecordWriter(os.fspath(path), "group_size:1")
    count = 0
    try:
        for data in encoded_images:
            writer.write(data)
            count += 1
    finally:
        writer.close()
    return count


class TfdsSource:
    """The encoded `image_key` feature of a TFDS dataset already prepared under `data_dir`.

    Never downloads or prepares: an unprepared dataset raises ValueError saying how to prepare it.
    The dataset must be stored as array_record (or parquet), the random-access formats.
    """

    def __init__(
        self, name: str, split: str = "train", data_dir: str | os.PathLike | None = None, image_key: str = "image"
    ) -> None:
        import tensorflow_datasets as tfds  # heavy import, only for this source

        how = (
            f"prepare it once with `tfds build {name} --file_format=array_record"
            f"{f' --data_dir={data_dir}' if data_dir else ''}` where the raw data is available"
        )
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError as err:
            raise UserError(f"TFDS dataset {name!r} not found (data_dir={data_dir}); {how}") from err
        if not builder.is_prepared():
            raise UserError(
                f"TFDS dataset {name!r} is not prepared under {builder.data_dir} (this loader never downloads); {how}"
            )
        features = list(builder.info.features)
        if image_key not in features:
            raise UserError(f"TFDS dataset {name!r} has no feature {image_key!r}; features: {features}")
        try:
            self._source = builder.as_data_source(split=split, decoders={image_key: tfds.decode.SkipDecoding()})
        except NotImplementedError as err:  # prepared as tfrecord: no random access
            raise UserError(f"TFDS dataset {name!r} is not stored as array_record; {how}") from err
        self.name, self.split, self.image_key = name, split, image_key
        self._features = builder.info.features

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> bytes:
        return self._source[i][self.image_key]

    def record(self, i: int) -> dict:
        """Every feature of record i (the image still encoded), e.g. its captions."""
        return self._source[i]

    @property
    def features(self) -> list[str]:
        """Names of the dataset's top-level features."""
        return list(self._features)

    def labels(self, label_key: str = "label") -> tuple[np.ndarray, list[str]]:
        """(int label of every record, class names) from a ClassLabel feature (reads every record once)."""
        names = getattr(self._features[label_key], "names", None) if label_key in self._features else None
        if names is None:
            raise UserError(f"TFDS dataset {self.name!r} has no ClassLabel feature {label_key!r}: it is unlabeled")
        return np.array([int(self._source[i][label_key]) for i in range(len(self))], np.int64), list(names)

    def __repr__(self) -> str:
        return f"TfdsSource(name={self.name!r}, split={self.split!r}, num_records={len(self)})"
