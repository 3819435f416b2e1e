"""The train loop every stage shares (distillation, UVC search, text-tower fine-tune): resume from the last
complete Orbax checkpoint, step, log metrics.jsonl / TensorBoard / the progress bar, evaluate in the loop,
checkpoint, and stop cleanly on SIGTERM. A stage says what to step and what to feed it in a `Loop`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm import tqdm

from dgmr_jax import data as data_lib
from dgmr_jax.core import storage
from dgmr_jax.core.errors import NonFiniteLoss
from dgmr_jax.core.parallel import DevicePrefetch
from dgmr_jax.train.checkpoint import TrainCheckpointer
from dgmr_jax.train.logs import JsonlLog, TensorBoard

BEST_FILE = "best.json"


@dataclasses.dataclass
class Loop:
    """What the loop drives: a compiled step over (state, device batch), its data, and how to log and save."""

    workdir: epath.Path
    mesh: Mesh
    step_fn: Callable[[Any, Any], tuple[Any, dict[str, jax.Array]]]  # (state, device batch) -> (state, metrics)
    state: Any  # fresh, on the mesh
    abstract_state: Any  # ShapeDtypeStructs with shardings: where a resumed state goes
    loader: Any  # grain loader of host batches
    total_steps: int
    global_batch: int
    checkpoint_every: int
    keep: int = 3
    async_checkpoint: bool = True
    log_every: int = 10
    batch_key: str | tuple[str, ...] = "images"  # what of each host batch goes to the device
    desc: str = "distill"
    shown: tuple[str, ...] = ("loss", "lr", "images_per_s", "mfu")  # metrics in the progress bar
    flops_per_example: float = 0.0  # for the MFU estimate (with peak_flops)
    peak_flops: float = 0.0
    log_indices: bool = False  # write each step's record indices to seen.jsonl
    evaluate: Callable[[Any, int], dict[str, float]] | None = None  # (state, step) -> metrics named "eval/..."
    eval_every: int = 0  # 0: evaluate at the end only
    best_metric: str = ""  # the eval metric whose best step goes to best.json (higher is better)
    after_step: Callable[[Any, int], None] | None = None  # (state, step) after each step's checkpoint save


@dataclasses.dataclass
class LoopResult:
    reason: str  # "done", or why the loop stopped early
    state: Any
    metrics: dict[str, float]  # the last logged row
    skipped_files: int


class _Stop:
    """A preemption notice (SIGTERM) ends the loop after a saved step. One process keeps a flag. Several processes
    use JAX's preemption service instead: it hears SIGTERM on any host and names one step for all of them, so
    every host takes part in the forced save (a collective) and stops at the same step."""

    def __init__(self):
        self.requested = False
        self._shared = jax.process_count() > 1
        if not self._shared:  # a Python handler would take SIGTERM from the preemption service's own
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def at(self, step: int) -> bool:
        """Whether to save and stop after `step`; every process must ask at every step."""
        return multihost_utils.reached_preemption_sync_point(step) if self._shared else self.requested

    def restore(self):
        if not self._shared:
            signal.signal(signal.SIGTERM, self._previous)


class _Best:
    """The best step so far of one eval metric, kept in workdir/best.json across restarts."""

    def __init__(self, workdir: epath.Path, metric: str, write: bool):
        self.path, self.metric, self.write = workdir / BEST_FILE, metric, write
        with storage.guard(f"reading {BEST_FILE}"):
            self.record = json.loads(self.path.read_text()) if self.path.exists() else None

    def update(self, row: dict[str, float]) -> None:
        value = row.get(self.metric)
        if value is None or (self.record and self.record["value"] >= value):
            return
        self.record = {"metric": self.metric, "value": value, "step": row["step"]}
        if self.write:
            with storage.guard(f"writing {BEST_FILE}"):
                self.path.write_text(json.dumps(self.record, indent=2))


def _check_loss(loss: float, done: int, ckpt: TrainCheckpointer) -> None:
    if not math.isfinite(loss):
        raise NonFiniteLoss(
            f"loss is {loss} at step {done}; stopped without saving. The last good checkpoint "
            f"(step {ckpt.latest_step()}) is kept: lower optim.base_lr or enable optim.clip_norm and rerun"
        )


def run_loop(loop: Loop) -> LoopResult:
    """Resume from the workdir's last complete checkpoint (or start), then step to loop.total_steps or a SIGTERM."""
    main_process = jax.process_index() == 0
    iterator = iter(loop.loader)
    ckpt = TrainCheckpointer(loop.workdir, loop.checkpoint_every, loop.keep, loop.async_checkpoint)
    start, state = _resume(loop, ckpt, iterator)
    step_fn = loop.step_fn
    feed = DevicePrefetch(iterator, loop.mesh, loop.batch_key)
    skipped = data_lib.SkipCounter()
    logs = _Logs(loop, main_process)
    best = _Best(loop.workdir, loop.best_metric, main_process) if loop.evaluate else None
    stop = _Stop()
    bar = tqdm(total=loop.total_steps, initial=start, desc=loop.desc, unit="step", disable=not main_process)
    last, tick, reason = {}, time.perf_counter(), "done"
    try:
        for step in range(start, loop.total_steps):
            batch, device_batch = next(feed)
            skipped.update(batch)
            state, metrics = step_fn(state, device_batch)
            feed.prefetch()  # the next batch's host work overlaps this step
            done = step + 1
            log_now = done % loop.log_every == 0 or done == loop.total_steps
            # read once: a SIGTERM arriving later in this step is acted on (saved, then stopped) at the next one
            stopping = stop.at(done)
            save_now = stopping or done == loop.total_steps or ckpt.manager.should_save(done)
            if log_now or save_now:  # the only host syncs: dispatch runs ahead in between
                _check_loss(float(metrics["loss"]), done, ckpt)
            logs.write_seen(done, batch)
            if log_now:
                now = time.perf_counter()
                ips = loop.log_every * loop.global_batch / max(now - tick, 1e-9)
                tick = now
                last = _train_row(loop, metrics, done, ips, skipped.total)
                logs.write(last, done)
                bar.set_postfix({k: f"{last[k]:.4g}" for k in loop.shown if k in last})
            if _eval_due(loop, done, stopping):
                _evaluate(loop, state, done, best, logs, bar)
                tick = time.perf_counter()  # evaluation time is not training throughput
            bar.update(1)
            ckpt.save(done, state, feed, force=save_now)
            if loop.after_step:
                loop.after_step(state, done)
            if stopping:
                reason = "preempted (SIGTERM): saved and stopped; run again with the same workdir to resume"
                break
    finally:
        ckpt.close()
        stop.restore()
        bar.close()
        logs.close()
    if main_process and reason != "done":
        print(reason)
    return LoopResult(reason, state, last, skipped.total)


def _resume(loop: Loop, ckpt: TrainCheckpointer, iterator: Any) -> tuple[int, Any]:
    """(first step, state): the workdir's last complete checkpoint, restored with its arrays straight on their
    shardings and the data iterator where it stopped; else step 0 and loop.state."""
    start = ckpt.latest_step()
    if start is None:
        return 0, loop.state
    if jax.process_index() == 0:
        print(f"{loop.desc}: resuming from step {start} of {loop.total_steps} ({loop.workdir})")
    return start, ckpt.restore(start, loop.abstract_state, iterator)


class _Logs:
    """metrics.jsonl, seen.jsonl (with loop.log_indices) and TensorBoard, written by the main process only."""

    def __init__(self, loop: Loop, main_process: bool):
        self.main_process = main_process
        self.metrics = JsonlLog(loop.workdir / "metrics.jsonl") if main_process else None
        self.seen = JsonlLog(loop.workdir / "seen.jsonl") if main_process and loop.log_indices else None
        self.tensorboard = TensorBoard(loop.workdir / "tensorboard") if main_process else None

    def write(self, row: dict[str, Any], step: int) -> None:
        if self.main_process:
            self.metrics.write(row)
            self.tensorboard.write(row, step)

    def write_seen(self, step: int, batch: dict[str, Any]) -> None:
        if self.seen:
            self.seen.write({"step": step, "index": batch["index"].tolist()})

    def close(self) -> None:
        if self.tensorboard:
            self.tensorboard.close()


def _train_row(loop: Loop, metrics: dict[str, Any], step: int, ips: float, skipped: int) -> dict[str, Any]:
    """The logged row of a training step: its metrics, throughput (and MFU given the peak), skipped files."""
    row = {k: float(v) for k, v in metrics.items()} | {"step": step, "images_per_s": ips, "skipped_files": skipped}
    if loop.peak_flops:
        row["mfu"] = loop.flops_per_example * ips / loop.peak_flops
    return row


def _eval_due(loop: Loop, step: int, stopping: bool) -> bool:
    """Whether to evaluate after `step`: every loop.eval_every steps and at the end, never when stopping."""
    return bool(
        loop.evaluate
        and not stopping
        and (step == loop.total_steps or (loop.eval_every and step % loop.eval_every == 0))
    )


def _evaluate(loop: Loop, state: Any, step: int, best: _Best, logs: _Logs, bar: Any) -> None:
    """Run loop.evaluate, keep the best, log the row and show it under the progress bar."""
    row = {"step": step, **loop.evaluate(state, step)}
    best.update(row)
    logs.write(row, step)
    if logs.main_process:
        shown = ", ".join(f"{k.removeprefix('eval/')} {v:.4f}" for k, v in row.items() if k != "step")
        bar.write(f"{loop.desc}: step {step}: {shown}")
