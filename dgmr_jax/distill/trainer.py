"""The distillation loop: build teacher/student, stream data, step, log, checkpoint, resume, stop cleanly.

`build_run(config, workdir)` assembles everything a run needs (mesh, data, models, sharded state, the
compiled step); `train(config, workdir)` builds and loops. It runs unchanged on one CPU, 8 fake CPU
devices, a GPU node or a TPU pod, on local or gs:// workdirs; a run started again with the same workdir
resumes from its last complete checkpoint. The student is written as a model directory at the end
(workdir/model) and every `export_every` steps (workdir/models/step_<N>), and scored by `config.evals` every
`eval_every` steps (dgmr_jax.eval.in_loop) as that export would be. With `config.uvc.budget > 0` the
same run is a UVC search (dgmr_jax.uvc): its state also holds the counts, gates and duals, and its product is
the extraction `dgmr-jax uvc` makes from the final state.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from dgmr_jax import data as data_lib
from dgmr_jax.checkpoint import abstract_with_shardings
from dgmr_jax.distill import workdir as workdir_lib
from dgmr_jax.distill.loop import Loop, run_loop
from dgmr_jax.distill.loss import tap_config
from dgmr_jax.distill.step import (
    OptimConfig,
    TrainState,
    init_state,
    jit_step,
    make_optimizer,
    make_step,
    state_shardings,
)
from dgmr_jax.eval.in_loop import EvalSpec, InLoopEval, parse_evals, primary_metric
from dgmr_jax.layer_source import LayerSource, open_model
from dgmr_jax.model_dir import load_config
from dgmr_jax.models.config import ModelConfig
from dgmr_jax.models.tree import Params
from dgmr_jax.models.vit import logical_axes, param_shapes
from dgmr_jax.parallel import (
    batch_sharding,
    check_batch,
    make_mesh,
    maybe_initialize_distributed,
    sync_processes,
    tree_shardings,
)
from dgmr_jax.paths import PathLike, as_path
from dgmr_jax.preprocess import Preprocess
from dgmr_jax.prune.cost import count_flops
from dgmr_jax.prune.mlp import prune_mlp, target_widths
from dgmr_jax.uvc.config import SearchConfig
from dgmr_jax.uvc.search import init_search_state, make_optimizers, make_search_step


def open_teacher(tc: ml_collections.ConfigDict) -> LayerSource:
    """The teacher of `config.teacher`: a model directory, a PyTorch checkpoint, or (tests, benchmarks, plans)
    a seeded random init of a preset."""
    if tc.model_dir:
        return open_model(tc.model_dir)
    if tc.checkpoint:
        return open_model(tc.checkpoint, family=tc.family, arch=tc.arch)
    return open_model(f"preset:{tc.arch}", family=tc.family, seed=tc.seed, **dict(tc.arch_overrides))


def load_teacher(tc: ml_collections.ConfigDict) -> tuple[ModelConfig, Params, dict[str, Any]]:
    """(config, params, meta) of the teacher."""
    source = open_teacher(tc)
    return source.cfg, source.load(), source.meta


def build_student(
    sc: ml_collections.ConfigDict, teacher_cfg: ModelConfig, teacher: Params, teacher_meta: dict[str, Any]
) -> tuple[ModelConfig, Params, dict[str, Any]]:
    """(config, params, meta) of the student: a model directory (e.g. `dgmr-jax prune` output) or pruned
    from the teacher now."""
    if sc.model_dir:
        source = open_model(sc.model_dir)
        return source.cfg, source.load(), source.meta
    cfg, params = prune_mlp(teacher_cfg, teacher, method=sc.method, mlp_ratio=sc.mlp_ratio)
    return cfg, params, {**teacher_meta, "pruned": {"method": sc.method, "mlp_ratio": sc.mlp_ratio}}


def make_source(dc: ml_collections.ConfigDict) -> Any:
    """The unlabeled images of `config.data` (data.kind says how to read data.path; see data.open_images)."""
    if dc.kind not in data_lib.KINDS:
        raise ValueError(f"unknown data.kind {dc.kind!r}; choose one of {', '.join(data_lib.KINDS)}")
    if not dc.path and dc.kind != "mnist5k":
        what = {"folder": "an image folder", "array_record": "ArrayRecord files or a glob", "tfds": "a TFDS name"}
        raise ValueError(
            f"data.path is empty: set --config.data.path= to {what.get(dc.kind, 'the images')} (data.kind={dc.kind})"
        )
    return data_lib.open_images(dc.path, kind=dc.kind, split=dc.split, data_dir=dc.data_dir or None).source


def optim_config(config: ml_collections.ConfigDict) -> OptimConfig:
    return OptimConfig(global_batch=config.global_batch, **dict(config.optim))


def model_configs(config: ml_collections.ConfigDict) -> tuple[ModelConfig, ModelConfig]:
    """(teacher, student) configs of a recipe from config files and presets alone, no weights read:
    what `dgmr-jax plan` compiles. A student pruned at start gets the widths `prune_mlp` would give it."""
    teacher_cfg, sc = open_teacher(config.teacher).cfg, config.student
    if sc.model_dir:
        return teacher_cfg, open_model(sc.model_dir).cfg
    return teacher_cfg, teacher_cfg.replace(mlp_hidden=target_widths(teacher_cfg, sc.mlp_ratio))


@dataclasses.dataclass
class Step:
    """The train step of a run, before any weights exist: configs as computed, abstract state, shardings."""

    teacher_cfg: ModelConfig  # compute dtype of config.teacher
    student_cfg: ModelConfig  # dtype, param_dtype, remat of config.student
    optimizer: Any
    state_shapes: TrainState  # jax.ShapeDtypeStruct leaves
    teacher_shapes: Params  # jax.ShapeDtypeStruct leaves, in the teacher's dtype
    state_sh: TrainState
    teacher_sh: Params
    fn: Any  # jitted (state, teacher, images) -> (state, metrics)
    init: Any  # student params -> fresh state (TrainState, or SearchState for a UVC search)
    search: SearchConfig | None = None  # set for a UVC search

    def abstract_inputs(self, mesh: jax.sharding.Mesh, global_batch: int, img_size: int) -> tuple[Any, Any, Any]:
        """(state, teacher, images) as ShapeDtypeStructs carrying their shardings: what `fn.lower` takes."""
        images = jax.ShapeDtypeStruct((global_batch, img_size, img_size, 3), np.float32, sharding=batch_sharding(mesh))
        return (
            abstract_with_shardings(self.state_shapes, self.state_sh),
            abstract_with_shardings(self.teacher_shapes, self.teacher_sh),
            images,
        )


def build_step(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, teacher_cfg: ModelConfig, model_cfg: ModelConfig
) -> Step:
    """The sharded, jitted distillation step for these configs; shared by `train` and `dgmr-jax plan`."""
    opt = optim_config(config)
    student_cfg = model_cfg.replace(
        dtype=config.student.dtype, param_dtype=config.student.param_dtype, remat=config.student.remat
    )
    teacher_cfg = teacher_cfg.replace(dtype=config.teacher.dtype)
    cast = lambda tree, dtype: jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), tree)  # noqa: E731
    student_shapes = cast(param_shapes(student_cfg), config.student.param_dtype)
    teacher_shapes = cast(param_shapes(teacher_cfg), config.teacher.dtype)
    teacher_sh = tree_shardings(logical_axes(teacher_cfg), teacher_shapes, mesh, "teacher params")
    scfg = search_config(config)
    if scfg is None:
        tx = make_optimizer(opt)
        init = functools.partial(init_state, optimizer=tx, ema=opt.ema_decay > 0)
        step = make_step(
            tap_config(student_cfg, config.distill.tap),
            tap_config(teacher_cfg, config.distill.tap),
            tx,
            opt,
            config.distill.cls_coef,
            config.distill.feat_coef,
        )
    else:
        tx = make_optimizers(student_cfg, scfg)
        init = functools.partial(init_search_state, student_cfg, scfg=scfg, optimizers=tx)
        search = make_search_step(student_cfg, scfg, tx, teacher_cfg)
        key = jax.random.PRNGKey(config.data.seed)

        def step(state, teacher, images):  # this step's Gumbel noise from the step number: resumes draw the same
            return search(state, teacher, images, jax.random.fold_in(key, state.step))

    state_shapes = jax.eval_shape(init, student_shapes)
    state_sh = state_shardings(student_cfg, state_shapes, mesh)
    fn = jit_step(step, mesh, state_sh, teacher_sh)
    return Step(teacher_cfg, student_cfg, tx, state_shapes, teacher_shapes, state_sh, teacher_sh, fn, init, scfg)


def search_config(config: ml_collections.ConfigDict) -> SearchConfig | None:
    """The UVC search of a recipe (config.uvc with budget > 0), or None for plain distillation."""
    u = config.uvc
    if not u.budget:
        return None
    fields = {k: v for k, v in u.items() if k not in ("budget", "select")}
    fields.update(gate_init=tuple(u.gate_init), z_lr=tuple(tuple(p) for p in u.z_lr))
    d = config.distill
    return SearchConfig(
        budget=u.budget, weights=optim_config(config), tap=d.tap, cls_coef=d.cls_coef, feat_coef=d.feat_coef, **fields
    )


@dataclasses.dataclass
class Run:
    """Everything one distillation run is made of, before its first step."""

    config: ml_collections.ConfigDict
    workdir: epath.Path
    mesh: jax.sharding.Mesh
    opt: OptimConfig
    loader: Any
    step: Step
    teacher: Params  # on the mesh
    model_cfg: ModelConfig  # as the student is saved (its model directory's config)
    student_meta: dict[str, Any]
    state: TrainState  # fresh, on the mesh
    img_size: int


def build_run(config: ml_collections.ConfigDict, workdir: PathLike) -> Run:
    """Mesh, data, models, sharded fresh state and the jitted step; inputs are checked (and a resumed
    workdir's record compared) before the models load."""
    workdir = as_path(workdir)
    maybe_initialize_distributed()
    mesh = make_mesh(**dict(config.mesh))
    check_batch(config.global_batch, mesh)
    opt = optim_config(config)
    source = make_source(config.data)  # bad data paths fail before the (possibly huge) models load
    sig = workdir_lib.signature(config, source)
    workdir_lib.check_resume(workdir, sig)

    teacher_cfg, teacher, teacher_meta = load_teacher(config.teacher)
    model_cfg, student, student_meta = build_student(config.student, teacher_cfg, teacher, teacher_meta)
    img_size = config.data.img_size or model_cfg.img_size
    preprocess = Preprocess.from_meta(teacher_meta, teacher_cfg.name)
    student_meta = {**student_meta, "preprocess": preprocess.to_meta(img_size)}
    workdir_lib.record_run(workdir, sig, model_cfg, student_meta)
    step = build_step(config, mesh, teacher_cfg, model_cfg)
    student = jax.tree_util.tree_map(lambda p: np.asarray(p).astype(config.student.param_dtype), student)
    teacher = jax.tree_util.tree_map(lambda p: np.asarray(p).astype(config.teacher.dtype), teacher)
    loader = data_lib.make_loader(
        source,
        batch_size=config.global_batch // jax.process_count(),
        img_size=img_size,
        scale=tuple(config.data.scale),
        flip=config.data.flip,
        mean=preprocess.mean,
        std=preprocess.std,
        interpolation=preprocess.interpolation,
        seed=config.data.seed,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        worker_count=config.data.workers,
    )
    state = step.init(student)
    return Run(
        config=config,
        workdir=workdir,
        mesh=mesh,
        opt=opt,
        loader=loader,
        step=step,
        teacher=jax.device_put(teacher, step.teacher_sh),
        model_cfg=model_cfg,
        student_meta=student_meta,
        state=jax.device_put(state, step.state_sh),
        img_size=img_size,
    )


def _compile(run: Run) -> Any:
    """AOT-compile the step for the run's shapes, saying so: the first compile of a big model takes minutes."""
    main_process = jax.process_index() == 0
    if main_process:
        print(f"distill: compiling the train step ({run.config.global_batch} images of {run.img_size} px) ...")
    start = time.perf_counter()
    inputs = run.step.abstract_inputs(run.mesh, run.config.global_batch, run.img_size)
    compiled = run.step.fn.lower(*inputs).compile()
    if main_process:
        print(f"distill: compiled in {time.perf_counter() - start:.1f} s")
    return compiled


def _export(run: Run, state: TrainState, step: int, out: epath.Path) -> epath.Path:
    """Write the student at `step` (EMA weights with config.export_ema) as a model directory."""
    ema = bool(run.config.export_ema)
    params = state.ema if ema else state.params
    return workdir_lib.write_student(out, run.model_cfg, run.student_meta, params, step, ema, run.workdir)


def _export_final(run: Run, state: TrainState, step: int) -> epath.Path:
    """workdir/model holds the last step; an older one there (a run since extended) moves to models/."""
    final = run.workdir / workdir_lib.FINAL_MODEL
    if final.exists():
        old = load_config(final)[1].get("distilled", {}).get("step")
        if old == step:
            return final
        kept = run.workdir / workdir_lib.STEP_MODELS / f"step_{old}"
        if jax.process_index() == 0:
            if kept.exists():  # the same step was also exported on request
                final.rmtree()
            else:
                kept.parent.mkdir(parents=True, exist_ok=True)
                final.rename(kept)
        sync_processes(f"dgmr_jax.export_final:{final}")
    return _export(run, state, step, final)


def _best_metric(config: ml_collections.ConfigDict, evals: list[EvalSpec]) -> str:
    """The eval metric best.json follows, checked before anything loads."""
    if config.eval_every < 0:
        raise ValueError(f"--config.eval_every must be >= 0 (0: evaluate at the end only), got {config.eval_every}")
    if not evals:
        if config.eval_best or config.eval_every:
            raise ValueError(
                "--config.eval_every / eval_best need evaluations: set --config.evals (e.g. ['knn:mnist5k'])"
            )
        return ""
    if config.uvc.budget:
        raise ValueError("a UVC search has no student to evaluate in the loop: evaluate the extracted model instead")
    names = [f"eval/{e.name}/" for e in evals]
    if config.eval_best and not config.eval_best.startswith(tuple(names)):
        raise ValueError(f"--config.eval_best={config.eval_best!r} names no eval; metrics start with {names}")
    return config.eval_best or primary_metric(evals[0])


def train(config: ml_collections.ConfigDict, workdir: PathLike) -> dict[str, Any]:
    """Distill config.student from config.teacher for config.optim.total_steps steps; returns a summary."""
    if config.export_ema and not config.optim.ema_decay > 0:
        raise ValueError("--config.export_ema=true needs an EMA: set --config.optim.ema_decay (e.g. 0.999)")
    if config.export_every < 0:
        raise ValueError(f"--export-every must be >= 0 (0: only at the end), got {config.export_every}")
    if config.uvc.budget and (config.export_every or config.export_ema):
        raise ValueError(
            "a UVC search exports its slim model by extraction (`dgmr-jax uvc`): drop --export-every/--ema"
        )
    evals = parse_evals(config.evals)
    best_metric = _best_metric(config, evals)
    run = build_run(config, workdir)
    evaluate = None
    if evals:
        evaluator = InLoopEval(evals, run.model_cfg, run.student_meta, run.mesh, run.img_size)
        ema = bool(config.export_ema)
        evaluate = lambda state, step: evaluator(state.ema if ema else state.params)  # noqa: E731  as exported
    compiled, teacher = _compile(run), run.teacher
    flops_per_image = 3 * count_flops(run.step.student_cfg, run.img_size) + count_flops(
        run.step.teacher_cfg, run.img_size
    )
    every, steps_dir = config.export_every, run.workdir / workdir_lib.STEP_MODELS

    def export_on_schedule(state: TrainState, done: int) -> None:
        if every and done % every == 0 and done != run.opt.total_steps:
            _export(run, state, done, steps_dir / f"step_{done}")

    result = run_loop(
        Loop(
            workdir=run.workdir,
            mesh=run.mesh,
            step_fn=lambda state, images: compiled(state, teacher, images),
            state=run.state,
            abstract_state=abstract_with_shardings(run.step.state_shapes, run.step.state_sh),
            loader=run.loader,
            total_steps=run.opt.total_steps,
            global_batch=config.global_batch,
            checkpoint_every=config.checkpoint_every,
            keep=config.keep,
            async_checkpoint=config.async_checkpoint,
            log_every=config.log_every,
            desc="uvc search" if run.step.search else "distill",
            shown=("loss", "ratio_hard", "z", "lr", "images_per_s", "mfu"),
            flops_per_example=flops_per_image,
            peak_flops=config.peak_flops,
            log_indices=config.log_indices,
            after_step=export_on_schedule,
            evaluate=evaluate,
            eval_every=config.eval_every,
            best_metric=best_metric,
        )
    )
    reason, state = result.reason, result.state
    final_step = int(state.step)
    # a search's product is its extraction (dgmr_jax.uvc.extract), not the full-size weights
    model = _export_final(run, state, final_step) if reason == "done" and not run.step.search else None
    return {
        "reason": reason,
        "step": final_step,
        "metrics": result.metrics,
        "state": state,
        "student_cfg": run.step.student_cfg,
        "skipped_files": result.skipped_files,
        "model_dir": model,
        "metrics_file": run.workdir / "metrics.jsonl",
    }
