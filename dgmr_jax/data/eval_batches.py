"""Evaluation batches: every readable record of an image source, in order, as normalized eval views.

Used wherever images are embedded or scored rather than trained on: evaluation, the text stage's frozen image
embeddings, Taylor neuron scores. Unlike `make_loader`, which drops the last partial batch, `EvalBatches`
yields every readable record, the last batch smaller.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from dgmr_jax.core.errors import UserError
from dgmr_jax.data.transforms import DecodeOrSkip, normalize, resize_center_crop


class EvalBatches:
    """Every readable record of a source, in order, as batches {"images": (b, size, size, 3) float32, "index": (b,)}.

    The eval transform of `make_loader(train=False)` (resize shorter side to resize_size, center crop
    img_size, or with `square` resize to img_size x img_size; normalize), but single-process and never
    dropping the last partial batch. Records that `DecodeOrSkip` passes over (and logs) are left out rather
    than replaced: "index" names the record of each row, so callers select labels with it and can tell which
    records were skipped. len() counts
    batches as if every record were readable. A source with no readable record raises ValueError.
    """

    def __init__(
        self,
        source: Any,
        *,
        batch_size: int,
        img_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        resize_size: int | None = None,
        interpolation: str = "bicubic",
        square: bool = False,
    ) -> None:
        if batch_size <= 0 or len(source) == 0:
            raise UserError(f"need batch_size > 0 and a non-empty source, got {batch_size} and {len(source)} records")
        self.source, self.batch_size, self.img_size = source, batch_size, img_size
        self._decode = DecodeOrSkip(source)  # one per set: an unreadable record is warned about once, not every pass
        self.mean, self.std, self.resize_size, self.interpolation = mean, std, resize_size, interpolation
        self.square = square

    def __len__(self) -> int:
        return -(-len(self.source) // self.batch_size)

    def _readable(self) -> Iterator[tuple[int, Any]]:
        """(record index, RGB image) of each readable record, in order, each record decoded once."""
        i = 0
        while i < len(self.source):
            element = self._decode.map(i)  # the first readable record from i on, wrapping around to 0
            record = int(element["record"])
            if record < i:  # wrapped: the records from i on were all unreadable
                return
            yield record, element["image"]
            i = record + 1

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        index, images = [], []
        for i, image in self._readable():
            index.append(i)
            view = resize_center_crop(image, self.img_size, self.resize_size, self.interpolation, self.square)
            images.append(normalize(view, self.mean, self.std))
            if len(index) == self.batch_size:
                yield {"images": np.stack(images), "index": np.asarray(index, np.int64)}
                index, images = [], []
        if index:
            yield {"images": np.stack(images), "index": np.asarray(index, np.int64)}


def decoded_once(batches: EvalBatches, max_bytes: int) -> Iterable[dict[str, np.ndarray]]:
    """`batches` decoded now and kept as a list when its float32 images take at most `max_bytes`, else as given
    (read and decoded on each pass)."""
    if len(batches.source) * batches.img_size * batches.img_size * 12 <= max_bytes:
        return list(batches)
    return batches
