"""The train loop every stage shares (distillation, UVC search, text-tower fine-tune): resume from the newest
good Orbax checkpoint, step, log metrics.jsonl / TensorBoard / the progress bar, evaluate in the loop,
checkpoint, and stop cleanly on SIGTERM or Ctrl-C. A stage says what to step and what to feed it in a `Loop`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
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
from dgmr_jax.core.errors import Interrupted
from dgmr_jax.core.parallel import DevicePrefetch
from dgmr_jax.train.checkpoint import TrainCheckpointer
from dgmr_jax.train.logs import JsonlLog, TensorBoard, write_curves

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
    """A request to stop: a preemption notice (SIGTERM) or Ctrl-C (SIGINT) ends the loop after a saved step, and a
    second Ctrl-C ends the process at once (exit 130; the last complete checkpoint stays). One process keeps a flag.
    Several processes use JAX's preemption service instead: it hears SIGTERM on any host (Ctrl-C is passed on to
    it as one) and names one step for all of them, so every host takes part in the forced save (a collective) and
    stops at the same step."""

    def __init__(self, desc: str):
        self.desc = desc
        self.requested = False
        self.interrupted = False  # this process got a Ctrl-C
        self._shared = jax.process_count() > 1
        # with several processes a Python handler would take SIGTERM from the preemption service's own
        handled = (signal.SIGINT,) if self._shared else (signal.SIGINT, signal.SIGTERM)
        self._previous = {signum: signal.signal(signum, self._handle) for signum in handled}

    def _handle(self, signum, frame):
        """Note the request; a second Ctrl-C ends the process here."""
        if signum == signal.SIGINT:
            if self.interrupted:
                _say(f"{self.desc}: Ctrl-C again: stopped at once; rerun to resume from the last saved step")
                with contextlib.suppress(Exception):  # what was printed before goes out; nothing else runs
                    sys.stdout.flush()
                os._exit(130)
            self.interrupted = True
            _say(f"{self.desc}: Ctrl-C: saving the next step, then stopping (Ctrl-C again: stop at once, unsaved)")
            if self._shared:
                os.kill(os.getpid(), signal.SIGTERM)  # the preemption service tells every host
                return
        self.requested = True

    def at(self, step: int) -> bool:
        """Whether to save and stop after `step`; every process must ask at every step."""
        return multihost_utils.reached_preemption_sync_point(step) if self._shared else self.requested

    def cause(self) -> str:
        """What stopped the run, as its closing line names it."""
        return "interrupted (Ctrl-C)" if self.interrupted else "preempted (SIGTERM)"

    def restore(self):
        """Hand the signals back to the handlers they had before the loop."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _say(line: str) -> None:
    """One line on stderr from a signal handler: written straight to the file descriptor, which never raises
    for a write the handler interrupted (the progress bar's, say), as a print to sys.stderr can."""
    with contextlib.suppress(OSError):
        os.write(2, f"\n{line}\n".encode())


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


def run_loop(loop: Loop) -> LoopResult:
    """Resume from the workdir's newest good checkpoint (or start), then step to loop.total_steps or a stop
    request: a SIGTERM saves, stops and returns; a Ctrl-C saves, stops and raises Interrupted."""
    stop = _Stop(loop.desc)  # from here on, Ctrl-C and SIGTERM stop the run after a saved step
    try:
        result = _run(loop, stop)
    finally:
        stop.restore()
    if stop.interrupted and result.reason != "done":
        raise Interrupted(result.reason)
    return result


def _run(loop: Loop, stop: _Stop) -> LoopResult:
    """The loop of run_loop, stopping where `stop` asks; a finished workdir is restored and left as it is."""
    main_process = jax.process_index() == 0
    iterator = iter(loop.loader)
    ckpt = TrainCheckpointer(loop.workdir, loop.checkpoint_every, loop.keep, loop.async_checkpoint)
    start, state, skipped = _resume(loop, ckpt, iterator)
    if start >= loop.total_steps:  # nothing to train: write nothing (no log, no TensorBoard file)
        ckpt.close()
        return LoopResult("done", state, {}, skipped.total)
    step_fn = loop.step_fn
    feed = DevicePrefetch(iterator, loop.mesh, loop.batch_key)
    logs = _Logs(loop, main_process, start)
    best = _Best(loop.workdir, loop.best_metric, main_process) if loop.evaluate else None
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
            # the only host syncs, dispatch runs ahead in between; a step after a save reads the loss of its params
            if log_now or save_now or ckpt.awaits_loss(done):
                ckpt.check_loss(float(metrics["loss"]), done)
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
            ckpt.save(done, state, feed, skipped.records, force=save_now)
            if loop.after_step:
                loop.after_step(state, done)
            if stopping:
                reason = f"{stop.cause()}: saved step {done} and stopped; run again with the same workdir to resume"
                break
    finally:
        ckpt.close()
        bar.close()
        logs.close()
    if main_process and start < loop.total_steps:  # a finished workdir's rerun draws nothing new
        write_curves(loop.workdir, loop.desc)
    if main_process and reason != "done" and not stop.interrupted:  # an interruption is the caller's to report
        print(reason)
    return LoopResult(reason, state, last, skipped.total)


def _resume(loop: Loop, ckpt: TrainCheckpointer, iterator: Any) -> tuple[int, Any, data_lib.SkipCounter]:
    """(first step, state, skip counter): the workdir's newest good checkpoint, restored with its arrays straight
    on their shardings and the data iterator where it stopped; else step 0 and loop.state."""
    restored = ckpt.restore_latest(loop.abstract_state, iterator)
    if restored is None:
        return 0, loop.state, data_lib.SkipCounter()
    if jax.process_index() == 0 and restored.step >= loop.total_steps:
        print(f"{loop.desc}: already finished: step {restored.step} of {loop.total_steps} is saved in {loop.workdir}")
    elif jax.process_index() == 0:
        print(f"{loop.desc}: resuming from step {restored.step} of {loop.total_steps} ({loop.workdir})")
    return restored.step, restored.state, data_lib.SkipCounter(set(restored.skipped_records))


class _Logs:
    """metrics.jsonl, seen.jsonl (with loop.log_indices) and TensorBoard, written by the main process only; rows of
    steps after `start` (a resumed run redoes them) are dropped from the JSON-lines files."""

    def __init__(self, loop: Loop, main_process: bool, start: int):
        self.main_process = main_process
        self.metrics = JsonlLog(loop.workdir / "metrics.jsonl", start) if main_process else None
        self.seen = JsonlLog(loop.workdir / "seen.jsonl", start) if main_process and loop.log_indices else None
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
