"""Per-host grain DataLoader over an image source, with resumable state and a skip counter.

Each host passes its own `shard_index`/`shard_count` (e.g. `jax.process_index()`,
`jax.process_count()`) and reads a disjoint, interleaved slice of one global record stream;
`batch_size` is the per-host batch, and the global batch is assembled with
`jax.make_array_from_process_local_data`. Global batch k holds the same records whatever the host count.
Every batch is a dict:
  "images":  float32 (batch, img_size, img_size, 3), channels-last, normalized with mean/std;
  "skipped": int32 (batch,), unreadable records passed over to fill each slot (see DecodeOrSkip);
  "index":   int64 (batch,), the sampled global record index of each slot;
  "record":  int64 (batch,), the record decoded into each slot (the index, unless records were passed over).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags

from dgmr_jax.core.errors import UserError
from dgmr_jax.data.transforms import DecodeOrSkip, EvalTransform, TrainTransform, passed_over


class _RecordKeys:
    """Data source handing out record keys: DecodeOrSkip reads the records so it can skip bad ones."""

    def __init__(self, source: Any) -> None:
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> int:
        return int(i)

    def __repr__(self) -> str:  # stored in the iterator state: resuming on another dataset fails
        return f"RecordKeys({self._source!r})"


def _check_args(
    *,
    num_records: int,
    batch_size: int,
    img_size: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    mean: Sequence[float],
    std: Sequence[float],
    seed: int,
    shard_index: int,
    shard_count: int,
    num_epochs: int | None,
    resize_size: int | None,
    max_image_pixels: int,
) -> None:
    """Raise ValueError, saying what to change, before any record is read."""
    if batch_size <= 0:
        raise UserError(f"batch_size must be a positive per-host batch size, got {batch_size}")
    if img_size <= 0:
        raise UserError(f"img_size must be positive, got {img_size}")
    if shard_count <= 0 or not 0 <= shard_index < shard_count:
        raise UserError(f"shard_index must be in [0, shard_count={shard_count}), got {shard_index}")
    per_shard = num_records // shard_count
    if per_shard < batch_size:
        raise UserError(
            f"each of the {shard_count} shards holds {per_shard} of the {num_records} records, fewer than one "
            f"batch of {batch_size}: lower batch_size or shard_count, or add images"
        )
    for name, (lo, hi) in (("scale", scale), ("ratio", ratio)):
        if not 0 < lo <= hi:
            raise UserError(f"{name} must satisfy 0 < min <= max, got {(lo, hi)}")
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise UserError(f"mean and std need 3 channel values each and std > 0, got {mean}, {std}")
    if not (isinstance(seed, int) and 0 <= seed < 2**32):
        raise UserError(f"seed must be an int in [0, 2**32), got {seed!r}")
    if num_epochs is not None and num_epochs <= 0:
        raise UserError(f"num_epochs must be positive or None (repeat forever), got {num_epochs}")
    if resize_size is not None and resize_size < img_size:
        raise UserError(f"resize_size must be >= img_size ({img_size}), got {resize_size}")
    if max_image_pixels < 0:
        raise UserError(
            f"max_image_pixels must be >= 0 (0: $DGMR_MAX_IMAGE_PIXELS or the default), got {max_image_pixels}"
        )


def make_loader(
    source: Any,
    *,
    batch_size: int,
    img_size: int,
    scale: Sequence[float] = (0.9, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    flip: bool = False,
    mean: Sequence[float],
    std: Sequence[float],
    seed: int = 0,
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: int | None = None,
    worker_count: int = 0,
    train: bool = True,
    resize_size: int | None = None,
    interpolation: str = "bicubic",
    max_image_pixels: int = 0,
    square: bool = False,
) -> grain.DataLoader:
    """Batches of normalized images from `source` for this host (layout in the module docstring).

    train=True: shuffled with `seed`, RandomResizedCrop(img_size, scale, ratio) + optional flip.
    train=False: source order, resize shorter side to `resize_size` (default img_size) + center crop, or with
    `square` resize straight to img_size x img_size (SigLIP).
    Resizing uses PIL's `interpolation` filter ("bicubic" or "bilinear", as the model was trained).
    Partial batches are dropped (fixed shapes for jit), as are the records beyond
    `shard_count * (len(source) // shard_count)`. An example's crop/flip depends only on
    (seed, its global position in the sampled stream); which examples share a batch also depends
    on worker_count (grain batches inside each worker). Batches depend on nothing else, so
    `restore_loader` on a loader built with the same arguments continues exactly. Images over
    `max_image_pixels` (0: transforms.max_image_pixels()) are passed over like unreadable ones.
    """
    _check_args(
        num_records=len(source),
        batch_size=batch_size,
        img_size=img_size,
        scale=scale,
        ratio=ratio,
        mean=mean,
        std=std,
        seed=seed,
        shard_index=shard_index,
        shard_count=shard_count,
        num_epochs=num_epochs,
        resize_size=resize_size,
        max_image_pixels=max_image_pixels,
    )
    _mark_flags_parsed(worker_count)
    # The sampler defines one global stream (independent of the host count); the DataLoader gives host h the
    # positions h, h + P, h + 2P, ... So global batch k holds the same records (and crops) on 1 or P hosts.
    shard = grain.sharding.ShardOptions(shard_index=shard_index, shard_count=shard_count, drop_remainder=True)
    sampler = grain.samplers.IndexSampler(
        len(source), grain.sharding.NoSharding(), shuffle=train, num_epochs=num_epochs, seed=seed
    )
    view = dict(mean=mean, std=std, interpolation=interpolation)
    if train:
        transform = TrainTransform(img_size, scale=scale, ratio=ratio, flip=flip, **view)
    else:
        transform = EvalTransform(img_size, resize_size=resize_size, square=square, **view)
    return grain.DataLoader(
        data_source=_RecordKeys(source),
        sampler=sampler,
        operations=[
            DecodeOrSkip(source, max_image_pixels),
            transform,
            grain.transforms.Batch(batch_size, drop_remainder=True),
        ],
        worker_count=worker_count,
        shard_options=shard,
    )


def _mark_flags_parsed(worker_count: int) -> None:
    """grain workers read an absl flag and crash when the program never parsed flags (no absl.app); the flags'
    defaults are what we want (grain issue #1355)."""
    if worker_count > 0 and not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def loader_state(iterator: grain.DataLoaderIterator) -> bytes:
    """Serialized position of `iter(loader)` (small JSON bytes), to save beside the train state."""
    return iterator.get_state()


def restore_loader(iterator: grain.DataLoaderIterator, state: bytes) -> None:
    """Move a fresh `iter(loader)` to a saved position: its next batches are those the saved one would give."""
    try:
        iterator.set_state(state)
    except ValueError as err:
        raise UserError(
            f"cannot resume the data loader from this state: {err}\nRebuild the loader with the source, seed, "
            "shard_index/shard_count, num_epochs and worker_count of the run that saved it"
        ) from err


def skipped_total(batch: Mapping[str, np.ndarray]) -> int:
    """Number of unreadable records passed over to fill this batch."""
    return int(np.sum(batch["skipped"]))


@dataclasses.dataclass
class SkipCounter:
    """The unreadable records this host's loader passed over, each counted once however often it was sampled,
    for the training log.

    Per host: hosts may pass over the same file. A resumed run starts from the records its checkpoint saved.
    """

    records: set[int] = dataclasses.field(default_factory=set)

    @property
    def total(self) -> int:
        """Distinct unreadable records seen so far."""
        return len(self.records)

    def update(self, batch: Mapping[str, np.ndarray]) -> int:
        """Add a batch's passed-over records; return the new total."""
        for slot in np.flatnonzero(batch["skipped"]):
            self.records.update(passed_over(*(int(batch[k][slot]) for k in ("index", "skipped", "record"))))
        return self.total

    def __str__(self) -> str:
        return f"{self.total} corrupt/unreadable files skipped so far"
