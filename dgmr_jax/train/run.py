"""The teacher-student image run every image task shares: build it, compile its step, loop, let the task finish.

`build_run(task, config, workdir)` assembles what a run needs (mesh, data, teacher, the task's student, sharded
fresh state, the jitted step); `run_task` compiles the step ahead of time and drives the shared loop
(dgmr_jax.train.loop). It runs unchanged on one CPU, 8 fake CPU devices, a GPU node or a TPU pod, on local or
gs:// workdirs; a run started again with the same workdir resumes from its last complete checkpoint.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental.compilation_cache import compilation_cache

from dgmr_jax import data as data_lib
from dgmr_jax.core import storage
from dgmr_jax.core.errors import UserError
from dgmr_jax.core.parallel import (
    batch_sharding,
    check_batch,
    make_mesh,
    maybe_initialize_distributed,
    tree_shardings,
)
from dgmr_jax.core.paths import PathLike, as_path
from dgmr_jax.io.open import LayerSource, open_model
from dgmr_jax.models.config import ModelConfig
from dgmr_jax.models.cost import count_flops
from dgmr_jax.models.preprocess import Preprocess
from dgmr_jax.models.tree import Params
from dgmr_jax.models.vit import logical_axes, param_shapes
from dgmr_jax.train import workdir as workdir_lib
from dgmr_jax.train.checkpoint import abstract_with_shardings
from dgmr_jax.train.defaults import loop_settings
from dgmr_jax.train.loop import Loop, LoopResult, run_loop
from dgmr_jax.train.state import OptimConfig, jit_step, state_shardings
from dgmr_jax.train.task import Task


def open_teacher(tc: ml_collections.ConfigDict, weights: bool = True) -> LayerSource:
    """The teacher of `config.teacher`: a model directory, a PyTorch checkpoint, or a seeded random init of a
    preset, which a run trains against only when `teacher.random_init` asks for it (`weights=False`: the
    config alone, as `plan` reads it)."""
    if tc.model_dir:
        return open_model(tc.model_dir)
    if tc.checkpoint:
        return open_model(tc.checkpoint, family=tc.family, arch=tc.arch)
    if weights and not tc.get("random_init", False):
        raise UserError(
            "config.teacher has no weights: set --config.teacher.model_dir=DIR (a `dgmr-jax convert` output), or "
            "--config.teacher.random_init=true to distill from a random init of "
            f"{tc.arch} (tests, benchmarks)"
        )
    return open_model(f"preset:{tc.arch}", family=tc.family, seed=tc.seed, **dict(tc.arch_overrides))


def scan_layout(cfg: ModelConfig, config: ml_collections.ConfigDict, who: str) -> ModelConfig:
    """`cfg` in the layer layout `config.<who>.scan_layers` asks for (who: "teacher" or "student"); a stack whose
    layers differ (per-layer widths or heads) cannot be scanned, which is said in one line."""
    scan = bool(config[who].get("scan_layers", False))
    if scan and not cfg.uniform:
        raise UserError(
            f"--config.{who}.scan_layers=true needs the same heads, value widths and MLP width in every layer, and "
            f"the {who} ({cfg.name}) has per-layer widths: set --config.{who}.scan_layers=false"
        )
    return cfg.replace(scan_layers=scan)


def use_compile_cache(config: ml_collections.ConfigDict, workdir: epath.Path) -> str:
    """Point JAX's persistent compilation cache at `config.compile_cache` ("{workdir}" is the run's workdir; "":
    no cache) before the run's first compile, so a restarted or resumed run loads its compiled step instead of
    compiling it again. Local or gs:// (JAX writes it through etils.epath); only process 0 writes entries, every
    process reads them, so a multi-host run wants a directory all hosts see. Returns the directory ("" if off)."""
    path = str(config.get("compile_cache", "")).replace("{workdir}", str(workdir))
    jax.config.update("jax_compilation_cache_dir", path or None)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(config.get("compile_cache_min_s", 1.0)))
    compilation_cache.reset_cache()  # the cache is set up at the next compile, with this directory
    return path


def teacher_spec(tc: ml_collections.ConfigDict) -> str:
    """How messages name the teacher of `config.teacher`: its model directory or checkpoint, else "random init"."""
    return tc.model_dir or tc.checkpoint or "random init"


def make_source(dc: ml_collections.ConfigDict) -> Any:
    """The unlabeled images of `config.data` (data.kind says how to read data.path; see data.open_images)."""
    if dc.kind not in data_lib.KINDS:
        raise UserError(f"unknown data.kind {dc.kind!r}; choose one of {', '.join(data_lib.KINDS)}")
    if not dc.path and dc.kind != "mnist5k":
        what = {"folder": "an image folder", "array_record": "ArrayRecord files or a glob", "tfds": "a TFDS name"}
        raise UserError(
            f"data.path is empty: set --config.data.path= to {what.get(dc.kind, 'the images')} (data.kind={dc.kind})"
        )
    return data_lib.open_images(dc.path, kind=dc.kind, split=dc.split, data_dir=dc.data_dir or None).source


def optim_config(config: ml_collections.ConfigDict) -> OptimConfig:
    """The optimizer settings of a recipe (config.optim at config.global_batch)."""
    return OptimConfig(global_batch=config.global_batch, **dict(config.optim))


@dataclasses.dataclass
class Step:
    """The train step of a run, before any weights exist: configs as computed, abstract state, shardings."""

    teacher_cfg: ModelConfig  # compute dtype of config.teacher
    student_cfg: ModelConfig  # dtype, param_dtype, remat of config.student
    optimizer: Any
    state_shapes: Any  # jax.ShapeDtypeStruct leaves
    teacher_shapes: Params  # jax.ShapeDtypeStruct leaves, in the teacher's dtype
    state_sh: Any
    teacher_sh: Params
    fn: Any  # jitted (state, teacher, images) -> (state, metrics)
    init: Any  # jitted, donating: student params on the mesh (state_sh.params) -> fresh state on the mesh

    def abstract_inputs(self, mesh: jax.sharding.Mesh, global_batch: int, img_size: int) -> tuple[Any, Any, Any]:
        """(state, teacher, images) as ShapeDtypeStructs carrying their shardings: what `fn.lower` takes."""
        images = jax.ShapeDtypeStruct((global_batch, img_size, img_size, 3), np.float32, sharding=batch_sharding(mesh))
        return (
            abstract_with_shardings(self.state_shapes, self.state_sh),
            abstract_with_shardings(self.teacher_shapes, self.teacher_sh),
            images,
        )

    def abstract_student(self) -> Any:
        """The student params as ShapeDtypeStructs carrying their shardings: what `init.lower` takes."""
        return abstract_with_shardings(self.state_shapes.params, self.state_sh.params)


def _shapes(tree: Any, dtype: str) -> Any:
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), tree)


def build_step(
    task: Task,
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    teacher_cfg: ModelConfig,
    model_cfg: ModelConfig,
) -> Step:
    """The task's step, sharded and jitted for these configs; shared by `run_task` and `dgmr-jax plan`."""
    student_cfg = scan_layout(model_cfg, config, "student").replace(
        dtype=config.student.dtype, param_dtype=config.student.param_dtype, remat=config.student.remat
    )
    teacher_cfg = scan_layout(teacher_cfg, config, "teacher").replace(dtype=config.teacher.dtype)
    student_shapes = _shapes(param_shapes(student_cfg), config.student.param_dtype)
    teacher_shapes = _shapes(param_shapes(teacher_cfg), config.teacher.dtype)
    teacher_sh = tree_shardings(logical_axes(teacher_cfg), teacher_shapes, mesh, "teacher params")
    made = task.make_step(config, teacher_cfg, student_cfg)
    state_shapes = jax.eval_shape(made.init, student_shapes)
    state_sh = state_shardings(student_cfg, state_shapes, mesh)
    fn = jit_step(made.step, mesh, state_sh, teacher_sh)
    # the fresh state made where it lives: each device computes only its shards of params, moments and EMA
    init = jax.jit(made.init, in_shardings=(state_sh.params,), out_shardings=state_sh, donate_argnums=(0,))
    return Step(teacher_cfg, student_cfg, made.optimizer, state_shapes, teacher_shapes, state_sh, teacher_sh, fn, init)


def model_configs(task: Task, config: ml_collections.ConfigDict) -> tuple[ModelConfig, ModelConfig]:
    """(teacher, student) configs of a recipe from config files and presets alone, no weights read."""
    teacher_cfg = open_teacher(config.teacher, weights=False).cfg
    return teacher_cfg, task.student_config(config, teacher_cfg)


@dataclasses.dataclass
class Run:
    """Everything one run is made of, before its first step."""

    config: ml_collections.ConfigDict
    workdir: epath.Path
    mesh: jax.sharding.Mesh
    opt: OptimConfig
    loader: Any
    step: Step
    teacher: Params  # on the mesh
    model_cfg: ModelConfig  # the student's config in the run's layer layout (saved per layer: io.model_dir)
    student_meta: dict[str, Any]
    state: Any  # fresh, on the mesh
    img_size: int


def _loader(config: ml_collections.ConfigDict, source: Any, preprocess: Preprocess, img_size: int) -> Any:
    """This process's share of the training images, augmented and normalized as the teacher expects."""
    dc = config.data
    return data_lib.make_loader(
        source,
        batch_size=config.global_batch // jax.process_count(),
        img_size=img_size,
        scale=tuple(dc.scale),
        flip=dc.flip,
        mean=preprocess.mean,
        std=preprocess.std,
        interpolation=preprocess.interpolation,
        seed=dc.seed,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        worker_count=dc.workers,
        max_image_pixels=dc.max_image_pixels,
    )


def _img_size(config: ml_collections.ConfigDict, teacher_cfg: ModelConfig, student_cfg: ModelConfig) -> int:
    """The run's image size (config.data.img_size, else the student's), which both models must cut into patches."""
    img_size = config.data.img_size or student_cfg.img_size
    for who, cfg in (("teacher", teacher_cfg), ("student", student_cfg)):
        if img_size % cfg.patch_size:
            raise UserError(
                f"data.img_size {img_size} is not a multiple of the {who}'s patch size {cfg.patch_size} ({cfg.name}): "
                f"set --config.data.img_size to a multiple of it (0: the student's {student_cfg.img_size})"
            )
    return img_size


def build_run(task: Task, config: ml_collections.ConfigDict, workdir: PathLike) -> Run:
    """Mesh, data, models, sharded fresh state and the jitted step; inputs are checked (and a resumed
    workdir's record compared) before the models load."""
    workdir = as_path(workdir)
    maybe_initialize_distributed()
    mesh = make_mesh(**dict(config.mesh))
    check_batch(config.global_batch, mesh)
    source = make_source(config.data)  # bad data paths fail before the (possibly huge) models load
    sig = {**workdir_lib.signature(config, source), **task.signature(config)}
    workdir_lib.check_resume(workdir, sig)

    teacher_source = open_teacher(config.teacher)
    # configs alone: a student the teacher cannot teach fails here, before weights load or anything is written
    student_cfg = scan_layout(task.student_config(config, teacher_source.cfg), config, "student")
    img_size = _img_size(config, teacher_source.cfg, student_cfg)
    preprocess = Preprocess.from_meta(teacher_source.meta, teacher_source.cfg.name)
    loader = _loader(config, source, preprocess, img_size)  # reads nothing yet; its settings are checked here
    model_cfg, student, student_meta = task.student(config, teacher_source)
    model_cfg = scan_layout(model_cfg, config, "student")
    student_meta = {**student_meta, "preprocess": preprocess.to_meta(img_size)}
    workdir_lib.record_run(workdir, sig, model_cfg, student_meta)
    use_compile_cache(config, workdir)  # after the checks: a refused run leaves no cache folder behind
    step = build_step(task, config, mesh, teacher_source.cfg, model_cfg)
    # both models go onto the mesh shard by shard, stacked or per layer as the run asks, whatever their files
    teacher = teacher_source.place(step.teacher_sh, config.teacher.dtype)
    state = step.init(student.place(step.state_sh.params, config.student.param_dtype))
    return Run(
        config=config,
        workdir=workdir,
        mesh=mesh,
        opt=optim_config(config),
        loader=loader,
        step=step,
        teacher=teacher,
        model_cfg=model_cfg,
        student_meta=student_meta,
        state=state,
        img_size=img_size,
    )


def compile_step(run: Run, name: str) -> Any:
    """AOT-compile the step for the run's shapes, saying so: the first compile of a big model takes minutes."""
    main_process = jax.process_index() == 0
    if main_process:
        print(f"{name}: compiling the train step ({run.config.global_batch} images of {run.img_size} px) ...")
    start = time.perf_counter()
    inputs = run.step.abstract_inputs(run.mesh, run.config.global_batch, run.img_size)
    compiled = run.step.fn.lower(*inputs).compile()
    if main_process:
        print(f"{name}: compiled in {time.perf_counter() - start:.1f} s")
    return compiled


@dataclasses.dataclass
class TaskResult:
    """How a run ended: the loop's result, its last step, and what the task made of it (None if stopped early)."""

    loop: LoopResult
    run: Run
    step: int
    product: Any


def train_flops_per_image(step: Step, img_size: int) -> float:
    """Analytic FLOPs of one image's train step: student forward and backward, teacher forward."""
    return 3 * count_flops(step.student_cfg, img_size) + count_flops(step.teacher_cfg, img_size)


def run_task(task: Task, config: ml_collections.ConfigDict, workdir: PathLike) -> TaskResult:
    """Build the run, compile its step, loop to config.optim.total_steps (or a SIGTERM), then `task.finish`; a
    storage call past config.storage_timeout_s, or failing storage, ends the process in one line (core.storage)."""
    task.check(config)
    with storage.watch(as_path(workdir), config.storage_timeout_s):
        run = build_run(task, config, workdir)
        hooks = task.hooks(run)
        compiled, teacher = compile_step(run, task.name), run.teacher
        result = run_loop(
            Loop(
                workdir=run.workdir,
                mesh=run.mesh,
                step_fn=lambda state, images: compiled(state, teacher, images),
                state=run.state,
                abstract_state=abstract_with_shardings(run.step.state_shapes, run.step.state_sh),
                loader=run.loader,
                desc=task.name,
                shown=task.shown,
                flops_per_example=train_flops_per_image(run.step, run.img_size),
                peak_flops=config.peak_flops,
                log_indices=config.log_indices,
                after_step=hooks.after_step,
                evaluate=hooks.evaluate,
                best_metric=hooks.best_metric,
                **loop_settings(config),
            )
        )
        step = int(result.state.step)
        product = None
        if result.reason == "done":
            with storage.guard("writing the final model"):
                product = task.finish(run, result.state, step)
    return TaskResult(result, run, step, product)
