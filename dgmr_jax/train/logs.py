"""What process 0 of a run logs: JSON-lines files and TensorBoard events, in a local or gs:// workdir.

Cloud Storage objects cannot be appended to, so on gs:// a JSON-lines file is rewritten whole at each
write, and TensorBoard events are written to a local temporary folder and copied up after each flush
(tensorboardX's own gs:// writer keeps uploading when Python exits, and hangs there if the bucket is gone).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

from etils import epath

from dgmr_jax.core.paths import is_uri


class JsonlLog:
    """Rows appended to a JSON-lines file (kept across restarts). A run resumed from step N passes `drop_after=N`:
    the rows of later steps, which it is about to log again, are dropped from the file first."""

    def __init__(self, path: epath.Path, drop_after: int | None = None):
        self.path = path
        self._remote = is_uri(path)
        text = path.read_text() if path.exists() and (self._remote or drop_after is not None) else ""
        if drop_after is not None:
            kept = "".join(line + "\n" for line in text.splitlines() if _step(line) <= drop_after)
            if kept != text:
                path.write_text(kept)
            text = kept
        self._text = text if self._remote else ""

    def write(self, row: dict[str, Any]) -> None:
        line = json.dumps(row) + "\n"
        if self._remote:
            self._text += line
            self.path.write_text(self._text)
        else:
            with self.path.open("a") as f:
                f.write(line)


def _step(line: str) -> float:
    """The step of a logged row; inf for a line cut short (a run killed mid-write), which is dropped with them."""
    try:
        return json.loads(line).get("step", 0)
    except ValueError:
        return math.inf


class TensorBoard:
    """Scalars as TensorBoard events under `directory` (no-op without tensorboardX)."""

    def __init__(self, directory: epath.Path):
        self.directory = directory
        self._local = Path(tempfile.mkdtemp(prefix="dgmr-tb-")) if is_uri(directory) else Path(directory)
        try:
            from tensorboardX import SummaryWriter
        except ImportError:  # optional: the progress bar and metrics.jsonl still log
            self.writer = None
            return
        self.writer = SummaryWriter(str(self._local))

    def write(self, row: dict[str, Any], step: int) -> None:
        if self.writer is None:
            return
        for key, value in row.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()
        if is_uri(self.directory):
            for file in self._local.iterdir():
                (self.directory / file.name).write_bytes(file.read_bytes())

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if is_uri(self.directory):
            shutil.rmtree(self._local, ignore_errors=True)
