"""One path type for everything a run reads or writes: local files and `gs://` buckets alike.

It is etils.epath, the path type Orbax itself uses, so checkpoints, metrics, model directories and data
go through the same code on a laptop and on a pod. Cloud Storage needs the `gcs` extra
(`pip install 'dgmr-jax[gcs]'`).
"""

from __future__ import annotations

import os
import re
import tempfile

from etils import epath

from dgmr_jax.core.errors import UserError

PathLike = str | os.PathLike

_NAMED_SPEC = re.compile(r"[a-z][a-z0-9_]*:(?!//)")  # preset:NAME, tfds:NAME, onnx:NAME: a name, not a path


def as_path(p: PathLike) -> epath.Path:
    """`p` as an epath.Path: local paths made absolute (Orbax requires it), URIs such as gs:// unchanged."""
    text = os.fspath(p)
    if is_uri(text):
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def is_uri(p: PathLike) -> bool:
    """Whether `p` names a remote location (gs://, s3://, ...) rather than a local path."""
    return "://" in os.fspath(p)


def canonical(spec: PathLike) -> str:
    """The one spelling of an input that a run records and later compares (run.json): a local path absolute and
    normalised (`vit_tiny` typed in /work and `work/vit_tiny` typed in / agree), a URI without trailing slash;
    a named spec such as `preset:NAME` or `tfds:NAME` unchanged."""
    text = os.fspath(spec)
    return text if _NAMED_SPEC.match(text) else str(as_path(text))


def check_writable(path: PathLike, flag: str = "output") -> None:
    """Fail in one line, before any long work, if the local path `flag` (e.g. --out) names, a file or folder to
    create or a folder to write into, cannot be written: a file where a folder should be, or a folder that refuses
    a probe file (made and removed at once: nothing is left). URIs such as gs:// are not probed."""
    if is_uri(path):
        return
    target = str(as_path(path))
    folder = target if os.path.isdir(target) else os.path.dirname(target)
    while not os.path.lexists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise UserError(f"{flag} {path} cannot be written: {folder} is not a folder; choose another {flag}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".dgmr-jax-write-probe-", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise UserError(
            f"{flag} {path} cannot be written ({err.strerror or err} in {folder}); choose another {flag} "
            "or make that folder writable"
        ) from err
