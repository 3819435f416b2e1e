"""matplotlib for the reports' figures: files only, never a window."""

from __future__ import annotations

import functools
import io
from typing import Any

from etils import epath

from dgmr_jax.core.paths import PathLike, as_path


@functools.cache
def pyplot() -> Any:
    """matplotlib.pyplot with the Agg (file-only) backend, selected once per process on the first call."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: PathLike) -> epath.Path:
    """Write `fig` as a PNG to `path` (local or gs://, through a buffer) and close it."""
    png = io.BytesIO()
    try:
        fig.savefig(png, format="png", dpi=110)
    finally:
        pyplot().close(fig)
    path = as_path(path)
    path.write_bytes(png.getvalue())
    return path
