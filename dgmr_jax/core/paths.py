"""One path type for everything a run reads or writes: local files and `gs://` buckets alike.

It is etils.epath, the path type Orbax itself uses, so checkpoints, metrics, model directories and data
go through the same code on a laptop and on a pod. Cloud Storage needs the `gcs` extra
(`pip install 'dgmr-jax[gcs]'`).
"""

from __future__ import annotations

import os

from etils import epath

PathLike = str | os.PathLike


def as_path(p: PathLike) -> epath.Path:
    """`p` as an epath.Path: local paths made absolute (Orbax requires it), URIs such as gs:// unchanged."""
    text = os.fspath(p)
    if is_uri(text):
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def is_uri(p: PathLike) -> bool:
    """Whether `p` names a remote location (gs://, s3://, ...) rather than a local path."""
    return "://" in os.fspath(p)
