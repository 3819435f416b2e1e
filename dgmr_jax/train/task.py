"""What a stage plugs into the training core's teacher-student image run (dgmr_jax.train.run).

A task says which student it trains, what its train state and pure step are, what it adds to the run's
signature, and what it does in and after the loop (evaluate, export). The core does the rest: mesh, data,
models on the mesh, the jitted and AOT-compiled step, checkpoints, logs, resume and preemption.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import ml_collections

from dgmr_jax.io.open import LayerSource
from dgmr_jax.models.config import ModelConfig
from dgmr_jax.models.tree import Params

# (state, teacher params, images) -> (state, metrics)
StepFn = Callable[[Any, Params, Any], tuple[Any, dict[str, Any]]]


@dataclasses.dataclass
class TaskStep:
    """A task's optimizer, fresh-state constructor (student params -> state) and pure step."""

    optimizer: Any
    init: Callable[[Params], Any]
    step: StepFn


@dataclasses.dataclass
class LoopHooks:
    """What a task does inside the loop: evaluate (state, step) -> metrics, and act after each saved step."""

    evaluate: Callable[[Any, int], dict[str, float]] | None = None
    best_metric: str = ""
    after_step: Callable[[Any, int], None] | None = None


class Task(Protocol):
    """A stage run by `dgmr_jax.train.run.run_task`."""

    name: str  # progress bar and messages ("distill", "uvc search")
    shown: tuple[str, ...]  # metrics in the progress bar

    def check(self, config: ml_collections.ConfigDict) -> None:
        """Refuse bad settings before anything loads."""

    def signature(self, config: ml_collections.ConfigDict) -> dict[str, Any]:
        """What this task adds to the run's signature (a resume with other values is refused)."""

    def student(
        self, config: ml_collections.ConfigDict, teacher: LayerSource
    ) -> tuple[ModelConfig, LayerSource, dict[str, Any]]:
        """(config, weights, meta) of the student the run starts from; the run places the weights on the mesh shard
        by shard (LayerSource.place)."""

    def student_config(self, config: ml_collections.ConfigDict, teacher_cfg: ModelConfig) -> ModelConfig:
        """The student's config from configs alone, no weights read (what `plan` compiles); a student this teacher
        cannot teach (other patch grid or widths) is refused here, before anything loads or is written."""

    def make_step(
        self, config: ml_collections.ConfigDict, teacher_cfg: ModelConfig, student_cfg: ModelConfig
    ) -> TaskStep:
        """The optimizer, state constructor and pure step for these compute configs."""

    def hooks(self, run: Any) -> LoopHooks:
        """In-loop evaluation and per-step actions of a built run."""

    def finish(self, run: Any, state: Any, step: int) -> Any:
        """After a run that reached its last step: write its product (a model directory), or None."""
