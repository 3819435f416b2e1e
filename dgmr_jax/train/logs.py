"""What process 0 of a run logs: JSON-lines files and TensorBoard events, in a local or gs:// workdir.

Cloud Storage objects cannot be appended to, so on gs:// a JSON-lines file is rewritten whole at each
write, and TensorBoard events are written to a local temporary folder and copied up after each flush
(tensorboardX's own gs:// writer keeps uploading when Python exits, and hangs there if the bucket is gone).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from etils import epath

from dgmr_jax.core import storage
from dgmr_jax.core.paths import PathLike, as_path, is_uri
from dgmr_jax.core.plots import pyplot, save_png

CURVES_FILE = "curves.png"  # beside metrics.jsonl: its loss and eval curves, drawn at the end of a run


class JsonlLog:
    """Rows appended to a JSON-lines file (kept across restarts). A run resumed from step N passes `drop_after=N`:
    the rows of later steps, which it is about to log again, are dropped from the file first. A last line cut short
    (a full disk, a kill) is dropped when the file is opened again, so every line parses."""

    def __init__(self, path: epath.Path, drop_after: int | None = None):
        self.path = path
        self._remote = is_uri(path)
        with storage.guard(f"reading {path.name}"):
            text = path.read_text() if path.exists() and (self._remote or drop_after is not None) else ""
            if drop_after is not None:  # a line cut short (a full disk, a kill) has step inf: dropped too
                kept = "".join(line + "\n" for line in text.splitlines() if _step(line) <= drop_after)
                if kept != text:
                    path.write_text(kept)
                text = kept
            elif not self._remote and path.exists():
                _drop_torn_line(path)
        self._text = text if self._remote else ""

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


def _step(line: str) -> float:
    """The step of a logged row; inf for a line cut short (a run killed mid-write), which is dropped with them."""
    try:
        return json.loads(line).get("step", 0)
    except ValueError:
        return math.inf


def _summary_writer() -> Any:
    """tensorboardX's SummaryWriter class (None without tensorboardX: the progress bar and metrics.jsonl still log),
    imported with torch hidden unless torch is already loaded: its writer imports torch only to accept torch tensors,
    and only float scalars are written here; that import cost every run about 2 s of start-up."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # `import torch` raises ImportError while this is set
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    finally:
        if hide:
            del sys.modules["torch"]
    return SummaryWriter


class TensorBoard:
    """Scalars as TensorBoard events under `directory` (no-op without tensorboardX)."""

    def __init__(self, directory: epath.Path):
        self.directory = directory
        self._local = Path(tempfile.mkdtemp(prefix="dgmr-tb-")) if is_uri(directory) else Path(directory)
        writer = _summary_writer()
        self.writer = None if writer is None else writer(str(self._local))

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


def read_rows(path: PathLike) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file such as metrics.jsonl, in order (blank lines skipped)."""
    return [json.loads(line) for line in as_path(path).read_text().splitlines() if line.strip()]


def curves_figure(rows: list[dict[str, Any]]) -> Any:
    """The run at a glance: loss against step (the rows with a loss) and, when there are evaluations, each
    "eval/..." metric against step on a second panel, its legend to the right."""
    evals = sorted({key for row in rows for key in row if key.startswith("eval/")})
    fig, axes = pyplot().subplots(1, 2 if evals else 1, figsize=(13 if evals else 6, 4), squeeze=False)
    train = [row for row in rows if "loss" in row]
    scale = "log" if train and all(row["loss"] > 0 for row in train) else "linear"
    axes[0, 0].plot([row["step"] for row in train], [row["loss"] for row in train])
    axes[0, 0].set(xlabel="step", ylabel="loss", yscale=scale, title="Training loss")
    for key in evals:
        rows_with = [row for row in rows if key in row]
        steps, values = [row["step"] for row in rows_with], [row[key] for row in rows_with]
        axes[0, 1].plot(steps, values, marker="o", label=key.removeprefix("eval/"))
    if evals:
        axes[0, 1].set(xlabel="step", ylabel="metric", title="Evaluation")
        axes[0, 1].legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize="small")  # beside, not over, the lines
    fig.tight_layout()
    return fig


def write_curves(workdir: epath.Path, desc: str) -> None:
    """Draw workdir/metrics.jsonl as workdir/curves.png. A figure is never worth a run: a failure is one line."""
    metrics = workdir / "metrics.jsonl"
    if not metrics.exists():  # stopped before its first logged step
        return
    try:
        save_png(curves_figure(read_rows(metrics)), workdir / CURVES_FILE)
    except Exception as err:  # any failure (a bad row, a full disk, matplotlib) is a warning, not the run's end
        line = f"{desc}: warning: {CURVES_FILE} not drawn ({type(err).__name__}: {err})".splitlines()[0]
        print(line, file=sys.stderr)
