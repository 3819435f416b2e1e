"""Distillation as a task of the training core: the student (a model directory, or pruned from the teacher at
start), the feature-distillation step, in-loop evaluation, and the student written as a model directory.

`train(config, workdir)` runs it: the student goes to workdir/model at the end and to workdir/models/step_<N>
every `export_every` steps, and is scored by `config.evals` every `eval_every` steps (dgmr_jax.eval.in_loop)
as that export would be.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import ml_collections
from etils import epath

from dgmr_jax.core.errors import UserError
from dgmr_jax.core.parallel import sync_processes
from dgmr_jax.distill.loss import check_pair, tap_config
from dgmr_jax.distill.step import make_step
from dgmr_jax.eval.in_loop import EvalSpec, InLoopEval, parse_evals, primary_metric
from dgmr_jax.io.model_dir import incomplete, load_config
from dgmr_jax.io.open import LayerSource, open_model
from dgmr_jax.io.source import InMemorySource
from dgmr_jax.models.config import ModelConfig
from dgmr_jax.prune.mlp import prune_mlp, target_widths
from dgmr_jax.train import run as run_lib
from dgmr_jax.train import workdir as workdir_lib
from dgmr_jax.train.state import TrainState, init_state, make_optimizer
from dgmr_jax.train.task import LoopHooks, TaskStep


def _best_metric(config: ml_collections.ConfigDict, evals: list[EvalSpec]) -> str:
    """The eval metric best.json follows, checked before anything loads."""
    if config.eval_every < 0:
        raise UserError(f"--config.eval_every must be >= 0 (0: evaluate at the end only), got {config.eval_every}")
    if not evals:
        if config.eval_best or config.eval_every:
            raise UserError(
                "--config.eval_every / eval_best need evaluations: set --config.evals (e.g. ['knn:mnist5k'])"
            )
        return ""
    names = [f"eval/{e.name}/" for e in evals]
    if config.eval_best and not config.eval_best.startswith(tuple(names)):
        raise UserError(f"--config.eval_best={config.eval_best!r} names no eval; metrics start with {names}")
    return config.eval_best or primary_metric(evals[0])


class DistillTask:
    """Feature distillation of a student from its teacher (docs/method.md, Recovery by distillation)."""

    name = "distill"
    shown = ("loss", "lr", "images_per_s", "mfu")

    def __init__(self):
        self.evals: list[EvalSpec] = []
        self.best_metric = ""

    def check(self, config: ml_collections.ConfigDict) -> None:
        if config.export_ema and not config.optim.ema_decay > 0:
            raise UserError("--config.export_ema=true needs an EMA: set --config.optim.ema_decay (e.g. 0.999)")
        if config.export_every < 0:
            raise UserError(f"--export-every must be >= 0 (0: only at the end), got {config.export_every}")
        self.evals = parse_evals(config.evals)
        self.best_metric = _best_metric(config, self.evals)

    def signature(self, config: ml_collections.ConfigDict) -> dict[str, Any]:
        return {}

    def student(
        self, config: ml_collections.ConfigDict, teacher: LayerSource
    ) -> tuple[ModelConfig, LayerSource, dict[str, Any]]:
        """A model directory (e.g. `dgmr-jax prune` output), or pruned now from the teacher, read whole on this host
        for it (pruning at start is for models a host holds; prune a giant one with `dgmr-jax prune` first)."""
        sc = config.student
        if sc.model_dir:
            source = open_model(sc.model_dir)
            return source.cfg, source, source.meta
        cfg, params = prune_mlp(teacher.cfg, teacher.load(), method=sc.method, mlp_ratio=sc.mlp_ratio)
        meta = {**teacher.meta, "pruned": {"method": sc.method, "mlp_ratio": sc.mlp_ratio}}
        return cfg, InMemorySource(cfg, params, meta), meta

    def student_config(self, config: ml_collections.ConfigDict, teacher_cfg: ModelConfig) -> ModelConfig:
        """A student pruned at start gets the widths `prune_mlp` would give it; a model directory must fit the
        teacher's distillation tensors; both must have the tap (SigLIP has no raw class token)."""
        sc = config.student
        if sc.model_dir:
            cfg = open_model(sc.model_dir).cfg
        else:
            cfg = teacher_cfg.replace(mlp_hidden=target_widths(teacher_cfg, sc.mlp_ratio))
        names = (sc.model_dir or "pruned at start", run_lib.teacher_spec(config.teacher))
        check_pair(cfg, teacher_cfg, config.distill.tap, names)
        return cfg

    def make_step(
        self, config: ml_collections.ConfigDict, teacher_cfg: ModelConfig, student_cfg: ModelConfig
    ) -> TaskStep:
        opt = run_lib.optim_config(config)
        tx = make_optimizer(opt)
        d = config.distill
        step = make_step(
            tap_config(student_cfg, d.tap), tap_config(teacher_cfg, d.tap), tx, opt, d.cls_coef, d.feat_coef
        )
        return TaskStep(tx, functools.partial(init_state, optimizer=tx, ema=opt.ema_decay > 0), step)

    def hooks(self, run: run_lib.Run) -> LoopHooks:
        config = run.config
        weights = (lambda state: state.ema) if config.export_ema else (lambda state: state.params)  # as exported
        evaluate = None
        if self.evals:
            evaluator = InLoopEval(self.evals, run.model_cfg, run.student_meta, run.mesh, run.img_size)
            evaluate = lambda state, step: evaluator(weights(state))  # noqa: E731
        every, steps_dir = config.export_every, run.workdir / workdir_lib.STEP_MODELS

        def export_on_schedule(state: TrainState, done: int) -> None:
            if every and done % every == 0 and done != run.opt.total_steps:
                _export(run, state, done, steps_dir / f"step_{done}")

        return LoopHooks(evaluate=evaluate, best_metric=self.best_metric, after_step=export_on_schedule)

    def finish(self, run: run_lib.Run, state: TrainState, step: int) -> epath.Path:
        return _export_final(run, state, step)


def _export(run: run_lib.Run, state: TrainState, step: int, out: epath.Path) -> epath.Path:
    """Write the student at `step` (EMA weights with config.export_ema) as a model directory."""
    ema = bool(run.config.export_ema)
    params = state.ema if ema else state.params
    return workdir_lib.write_student(out, run.model_cfg, run.student_meta, params, step, ema, run.workdir)


def _export_final(run: run_lib.Run, state: TrainState, step: int) -> epath.Path:
    """workdir/model holds the last step; an older one there (a run since extended) moves to models/, an
    incomplete one (an interrupted export) is written again."""
    final = run.workdir / workdir_lib.FINAL_MODEL
    complete = incomplete(final) is None
    old = load_config(final)[1].get("distilled", {}).get("step") if complete else None
    sync_processes(f"dgmr_jax.export_final:{final}:read")  # every process has looked before process 0 moves it
    if complete:
        if old == step:
            return final
        kept = run.workdir / workdir_lib.STEP_MODELS / f"step_{old}"
        if jax.process_index() == 0:
            if incomplete(kept) is None:  # the same step was also exported on request
                final.rmtree()
            else:
                if kept.exists():  # an interrupted export of that step
                    kept.rmtree()
                kept.parent.mkdir(parents=True, exist_ok=True)
                final.rename(kept)
        sync_processes(f"dgmr_jax.export_final:{final}")
    return _export(run, state, step, final)


def build_step(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, teacher_cfg: ModelConfig, model_cfg: ModelConfig
) -> run_lib.Step:
    """The sharded, jitted distillation step for these configs; shared by `train` and `dgmr-jax plan`."""
    return run_lib.build_step(DistillTask(), config, mesh, teacher_cfg, model_cfg)


def model_configs(config: ml_collections.ConfigDict) -> tuple[ModelConfig, ModelConfig]:
    """(teacher, student) configs of a distillation recipe, no weights read: what `dgmr-jax plan` compiles."""
    return run_lib.model_configs(DistillTask(), config)


def train(config: ml_collections.ConfigDict, workdir: Any) -> dict[str, Any]:
    """Distill config.student from config.teacher for config.optim.total_steps steps; returns a summary."""
    result = run_lib.run_task(DistillTask(), config, workdir)
    return {
        "reason": result.loop.reason,
        "step": result.step,
        "metrics": result.loop.metrics,
        "state": result.loop.state,
        "student_cfg": result.run.step.student_cfg,
        "skipped_files": result.loop.skipped_files,
        "model_dir": result.product,
        "metrics_file": result.run.workdir / "metrics.jsonl",
    }
