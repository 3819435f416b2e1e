"""Orbax CheckpointManager for training: train state plus each host's grain iterator state.

Saves are asynchronous and atomic (Orbax writes to a temporary directory and renames it when the save is
complete), so a checkpoint cut short by SIGKILL is never restored; restoring places arrays straight into
their target shardings.
"""

from __future__ import annotations

from typing import Any

import grain.checkpoint
import jax
import orbax.checkpoint as ocp

from dgmr_jax.core import storage
from dgmr_jax.core.errors import UserError
from dgmr_jax.core.paths import PathLike, as_path


class TrainCheckpointer:
    """Keeps the last `keep` checkpoints under workdir/checkpoints, one every `every` steps."""

    def __init__(self, workdir: PathLike, every: int, keep: int = 3, async_save: bool = True):
        if every <= 0 or keep <= 0:
            raise UserError(f"checkpoint every ({every}) and keep ({keep}) must be > 0")
        self.directory = as_path(workdir) / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every, max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self.async_save = async_save
        with storage.guard("listing checkpoints"):
            self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any, force: bool = False) -> bool:
        """Save if `step` is on the interval (or force); returns whether a save started."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)
        )
        with storage.guard(f"saving checkpoint {step}"):
            started = self.manager.save(step, args=args, force=force)
        if started:
            storage.checkpoint_saved(step, pending=self.async_save)
        return started

    def restore(self, step: int, target: Any, data_iterator: Any) -> Any:
        """The train state of `step`, placed like `target` (a tree of ShapeDtypeStruct with shardings);
        the data iterator is moved to where that step left it."""
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=grain.checkpoint.CheckpointRestore(data_iterator)
        )
        try:
            with storage.guard(f"restoring checkpoint {step}"):
                state = self.manager.restore(step, args=args)["state"]
        except (ValueError, KeyError, TypeError) as err:  # Orbax/grain dump whole trees: keep the first line
            first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
            raise UserError(
                f"cannot resume from {self.directory / str(step)}: the saved state does not fit this run ({first}); "
                "start fresh with a new --workdir"
            ) from err
        storage.checkpoint_saved(step, pending=False)
        return state

    def wait(self) -> None:
        """Block until pending async saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        with storage.guard("finishing checkpoint writes"):
            self.manager.wait_until_finished()
            self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying target shardings: what StandardRestore needs to restore in place."""
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
