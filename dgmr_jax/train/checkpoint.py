"""Orbax CheckpointManager for training: train state, each host's grain iterator state, and a record that lets a
restore prove the state is the one saved.

Saves are asynchronous and atomic (Orbax writes to a temporary directory and renames it when the save is
complete), so a checkpoint cut short by SIGKILL is never restored, and its temporary directory is removed when
the run starts again; restoring places arrays straight into their target shardings.

Each step also holds `record` (JSON, written by process 0): a checksum of every array of the state, computed on
device at save time (`train.verify`), and the unreadable records the loop has passed over. A restore recomputes
the checksums on the restored arrays. A step that fails to restore or to verify is skipped with a one-line
warning and the next older one is tried; the skipped (newer) steps are deleted once an older one restores, since
the resumed run saves those steps again. A step without a record (written before records existed) restores
unverified, with a warning. A state counts as good only when it is finite and the loss of its own params is
finite: that loss is the next step's (the metrics of step N+1 are computed from the params saved at N), so the
loop reads it and `check_loss` deletes a step whose params diverged.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
from collections.abc import Iterable
from typing import Any

import grain.checkpoint
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from dgmr_jax.core import storage
from dgmr_jax.core.errors import NonFiniteLoss, UserError
from dgmr_jax.core.paths import PathLike, as_path
from dgmr_jax.train.verify import fingerprint

RECORD = "record"  # the item of each step holding its checksums and counters


@dataclasses.dataclass
class Restored:
    """A step restored and verified: where the run resumes."""

    step: int
    state: Any
    skipped_records: list[int]  # the unreadable records the loop passed over up to that step (process 0's)


class TrainCheckpointer:
    """Keeps the last `keep` checkpoints under workdir/checkpoints, one every `every` steps."""

    def __init__(self, workdir: PathLike, every: int, keep: int = 3, async_save: bool = True):
        if every <= 0 or keep <= 0:
            raise UserError(f"checkpoint every ({every}) and keep ({keep}) must be > 0")
        self.directory = as_path(workdir) / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every,
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,  # a save cut short (SIGKILL, a second Ctrl-C) leaves nothing behind
        )
        self._state_handler = ocp.StandardCheckpointHandler()
        handlers = {
            "state": self._state_handler,
            "data": grain.checkpoint.CheckpointHandler(),
            RECORD: ocp.JsonCheckpointHandler(),
        }
        self.async_save = async_save
        with storage.guard("listing checkpoints"):
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self.unchecked: int | None = None  # a step saved or restored whose params' loss is not known yet
        self._orphans = _OrphanedTransfers()
        self._orphans.quiet()  # from the first save or restore: a failed one's siblings report while it unwinds

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(
        self, step: int, state: Any, data_iterator: Any, skipped_records: Iterable[int] = (), force: bool = False
    ) -> bool:
        """Save if `step` is on the interval (or force), with its checksums; returns whether a save started.
        A state holding NaN or inf is never saved: the run stops (NonFiniteLoss)."""
        if not (force or self.manager.should_save(step)):
            return False
        checksums, finite = fingerprint(state)
        if not finite:
            self._stop(f"the state after step {step} holds NaN or inf values (not saved)")
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            **{RECORD: ocp.args.JsonSave({"checksums": checksums, "skipped_records": sorted(skipped_records)})},
        )
        with storage.guard(f"saving checkpoint {step}"):
            saved = self.manager.save(step, args=args, force=force)
        if saved:
            self.unchecked = step
            storage.checkpoint_saved(step, pending=self.async_save)
        return saved

    def awaits_loss(self, step: int) -> bool:
        """Whether the loss of `step` must be read: it is the loss of the params saved (or restored) at step - 1."""
        return self.unchecked == step - 1

    def check_loss(self, loss: float, step: int) -> None:
        """A finite loss at `step` accepts the state saved at step - 1; a NaN/inf one deletes that state (its own
        params diverged) and stops the run, naming the last good step."""
        if math.isfinite(loss):
            if self.unchecked is not None and self.unchecked < step:
                self.unchecked = None
            return
        what = f"loss is {loss} at step {step}"
        if self.unchecked == step - 1:
            self.wait()
            self.manager.delete(step - 1)
            self.unchecked = None
            what += f" (the loss of the params saved at step {step - 1}: that checkpoint is deleted)"
        self._stop(what)

    def _stop(self, what: str) -> None:
        """Raise NonFiniteLoss: what went wrong, which checkpoint is kept, and a rerun that works."""
        good = self.latest_step()
        kept = f"the last good checkpoint is step {good}" if good is not None else "no checkpoint is left"
        rerun = f"resumes from step {good}" if good is not None else "starts from step 0"
        raise NonFiniteLoss(
            f"{what}; stopped, {kept}. Lower optim.base_lr (or set optim.clip_norm) and rerun with the same "
            f"--workdir: it {rerun}"
        )

    def restore_latest(self, target: Any, data_iterator: Any) -> Restored | None:
        """The newest step that restores and verifies, placed like `target` (a tree of ShapeDtypeStruct with
        shardings), with the data iterator moved to where that step left it; None when there is no checkpoint.
        Damaged newer steps are warned about, skipped and, once an older one restores, deleted."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        for i, step in enumerate(steps):
            state, problem = self._attempt(step, target, data_iterator)
            if problem is None:
                for newer in steps[:i]:
                    self.manager.delete(newer)
                self.unchecked = step
                storage.checkpoint_saved(step, pending=False)  # what an outage message calls complete
                return Restored(step, state["state"], self._skipped_records(state))
            _say(f"warning: checkpoint {self.directory / str(step)} is damaged ({problem}); skipped")
        if not steps:
            return None
        raise UserError(
            f"no checkpoint in {self.directory} can be restored: steps {', '.join(map(str, steps))} are all damaged "
            f"(see the warnings above); start fresh with a new --workdir, or move {self.directory} away to rerun "
            "this workdir from step 0"
        )

    def _attempt(self, step: int, target: Any, data_iterator: Any) -> tuple[Any, str | None]:
        """(the restored items, None), or (None, why step is not good); the same answer on every process."""
        restored, problem = None, None
        try:
            self._check_fits(step, target)
            items = {
                "state": ocp.args.StandardRestore(target),
                "data": grain.checkpoint.CheckpointRestore(data_iterator),
            }
            if (self.directory / str(step) / RECORD).exists():
                items[RECORD] = ocp.args.JsonRestore()
            with storage.guard(f"restoring checkpoint {step}"):  # an outage is not damage: it exits
                restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except UserError:
            raise
        except Exception as err:  # damage raises anything: TensorStore's ValueError wrapped in a bare Exception by
            problem = _first_line(err)  # Orbax, FileNotFoundError, KeyError, grain's and json's errors
        if not _everywhere(problem is None):
            return None, problem or "unreadable on another process"
        if restored.get(RECORD) is None:
            _say(
                f"warning: checkpoint {self.directory / str(step)} has no checksums (saved by an older dgmr-jax); "
                "restored unverified"
            )
        return restored, _verify(restored["state"], restored.get(RECORD))

    def _check_fits(self, step: int, target: Any) -> None:
        """Refuse, in one line, a saved state whose arrays differ from this run's (other settings, not damage)."""
        saved = _shapes(self._state_handler.metadata(self.directory / str(step) / "state"))
        wanted = _shapes(target)
        if saved == wanted:
            return
        missing, extra = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
        reshaped = sorted(k for k in set(saved) & set(wanted) if saved[k] != wanted[k])
        diffs = [
            f"{label} {', '.join(keys[:3])}"
            for label, keys in (
                ("not saved:", missing),
                ("not in this run:", extra),
                ("other shape or dtype:", reshaped),
            )
            if keys
        ]
        raise UserError(
            f"cannot resume from {self.directory / str(step)}: the saved state does not fit this run "
            f"({'; '.join(diffs)}); restore the run's settings, or start fresh with a new --workdir"
        )

    @staticmethod
    def _skipped_records(restored: Any) -> list[int]:
        record = restored.get(RECORD)
        return [int(r) for r in record.get("skipped_records", [])] if record else []

    def wait(self) -> None:
        """Block until pending async saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        with storage.guard("finishing checkpoint writes"):
            self.manager.wait_until_finished()
            self.manager.close()
        self._orphans.restore()


class _OrphanedTransfers:
    """The noise of an Orbax save or restore that fails part-way (a full disk, a damaged checkpoint), silenced from
    `quiet` until `restore`: its other TensorStore transfers finish into the event loop Orbax has closed (dozens of
    unraisable "Event loop is closed" tracebacks, even while the run prints its one-line error, and Orbax read
    coroutines dropped unfinished) or into futures and
    tasks no one awaits (asyncio's "Future/Task exception was never retrieved"). The failure itself is reported
    where it is raised; anything else passes through."""

    def __init__(self):
        self._previous = None

    def quiet(self) -> None:
        if self._previous is None:
            self._previous = sys.unraisablehook
            sys.unraisablehook = self._unraisable
            logging.getLogger("asyncio").addFilter(self._log_filter)

    def restore(self) -> None:
        if self._previous is not None:
            sys.unraisablehook, self._previous = self._previous, None
            logging.getLogger("asyncio").removeFilter(self._log_filter)

    def _unraisable(self, report: Any) -> None:
        closed = isinstance(report.exc_value, RuntimeError) and str(report.exc_value) == "Event loop is closed"
        code = getattr(report.object, "cr_code", None)  # an Orbax read coroutine dropped with the failed restore
        if not (closed or (code is not None and "orbax" in code.co_filename)):
            self._previous(report)

    @staticmethod
    def _log_filter(record: logging.LogRecord) -> bool:
        unawaited = ("Future exception was never retrieved", "Task exception was never retrieved")
        return not record.getMessage().startswith(unawaited)


def _shapes(tree: Any) -> dict[tuple, tuple]:
    """Leaf path -> (shape, dtype) of a state or of its saved metadata, in Orbax's own key names."""
    return {
        ".".join(map(str, k)): (tuple(v.shape), np.dtype(v.dtype).name) for k, v in ocp.tree.to_flat_dict(tree).items()
    }


def _verify(state: Any, record: dict | None) -> str | None:
    """Why a restored state is not the one saved (a checksum differs; without a record, only: a value is NaN/inf),
    or None."""
    checksums, finite = fingerprint(state)
    differ = [k for k, v in checksums.items() if record is not None and record.get("checksums", {}).get(k) != v]
    if differ:
        return f"checksum of {len(differ)} array(s) differs, first {differ[0]}"
    return None if finite else "NaN or inf values"


def _everywhere(ok: bool) -> bool:
    """Whether `ok` holds on every process (each reads its own shards, so damage may show on one host only)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def _first_line(err: Exception) -> str:
    """The first line of the root cause (Orbax wraps TensorStore's errors, whose text runs on to whole specs)."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = str(err).split(" [tensorstore_spec=")[0].strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:300]}" if text else type(err).__name__


def _say(line: str) -> None:
    if jax.process_index() == 0:
        print(line, file=sys.stderr)


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying target shardings: what StandardRestore needs to restore in place."""
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
