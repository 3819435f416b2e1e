"""matplotlib for the reports' figures: files only, never a window."""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def pyplot() -> Any:
    """matplotlib.pyplot with the Agg (file-only) backend, selected once per process on the first call."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
