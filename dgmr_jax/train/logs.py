"""What process 0 of a run logs: JSON-lines files and TensorBoard events, in a local or gs:// workdir.

Cloud Storage objects cannot be appended to, so on gs:// a JSON-lines file is rewritten whole at each
write, and TensorBoard events are written to a local temporary folder and copied up after each flush
(tensorboardX's own gs:// writer keeps uploading when Python exits, and hangs there if the bucket is gone).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from etils import epath

from dgmr_jax.core import storage
from dgmr_jax.core.paths import is_uri


class JsonlLog:
    """Rows appended to a JSON-lines file (kept across restarts; a last line cut short, as by a full disk, is
    dropped when the file is opened again, so every line parses)."""

    def __init__(self, path: epath.Path):
        self.path = path
        self._remote, self._text = is_uri(path), ""
        with storage.guard(f"reading {path.name}"):
            if self._remote and path.exists():
                self._text = path.read_text()
            elif path.exists():
                _drop_torn_line(path)

    def write(self, row: dict[str, Any]) -> None:
        line = json.dumps(row) + "\n"
        with storage.guard(f"writing {self.path.name}"):
            if self._remote:
                self._text += line
                self.path.write_text(self._text)
            else:
                with self.path.open("a") as f:
                    f.write(line)


def _drop_torn_line(path: epath.Path) -> None:
    """Cut a local file back to its last complete line (Cloud Storage objects are written whole or not at all)."""
    with open(path, "rb+") as f:  # epath has no read-write mode
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


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
        with storage.guard("writing TensorBoard events"):
            self.writer.flush()
            if is_uri(self.directory):
                for file in self._local.iterdir():
                    (self.directory / file.name).write_bytes(file.read_bytes())

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if is_uri(self.directory):
            shutil.rmtree(self._local, ignore_errors=True)
