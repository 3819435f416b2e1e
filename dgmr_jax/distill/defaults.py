"""Defaults shared by every distillation recipe (`base_config()`); each recipe file edits a copy. UVC recipes
start from it too (dgmr_jax.uvc.config.with_search adds their search block)."""

from __future__ import annotations

import ml_collections

from dgmr_jax.train.defaults import loop_defaults

IMAGENET_TRAIN = 1_281_167  # images in ImageNet-1K train, the paper's unlabeled set


def steps(epochs: float, global_batch: int, dataset_size: int = IMAGENET_TRAIN) -> int:
    return int(epochs * dataset_size // global_batch)


def base_config() -> ml_collections.ConfigDict:
    """A teacher-student run's settings: models, loss, optimizer, data, the loop's, exports and in-loop evals."""
    c = loop_defaults()
    c.teacher = ml_collections.ConfigDict(
        dict(model_dir="", checkpoint="", family="timm", arch="vit_tiny_patch16_224", dtype="bfloat16", seed=0)
    )
    # without model_dir or checkpoint: a seeded random init of the `arch` preset, only when asked for (tests,
    # benchmarks); a forgotten model_dir is an error, not a run against noise
    c.teacher.random_init = False
    c.teacher.arch_overrides = ml_collections.ConfigDict()  # ModelConfig fields for a random-init teacher
    # one nn.scan over the layer stack instead of `depth` unrolled blocks: compiles in a fraction of the time for
    # deep models; whatever the model directory's layout (docs/pod.md, Time to first step)
    c.teacher.scan_layers = False
    c.student = ml_collections.ConfigDict(
        dict(model_dir="", method="diversity", mlp_ratio=1.0, dtype="bfloat16", param_dtype="float32", remat=False)
    )
    c.student.scan_layers = False  # needs the same widths in every layer
    c.distill = ml_collections.ConfigDict(dict(tap="output", cls_coef=1.0, feat_coef=1.0))
    c.optim = ml_collections.ConfigDict(
        dict(
            base_lr=6e-5,
            min_lr=1e-6,
            warmup_steps=0,
            total_steps=1000,
            clip_norm=0.0,
            accum_steps=1,
            ema_decay=0.0,
            eps=1e-8,
        )
    )
    c.data = ml_collections.ConfigDict(
        dict(
            kind="folder",
            path="",
            split="train",
            data_dir="",
            img_size=0,
            scale=(0.9, 1.0),
            flip=False,
            workers=0,
            seed=0,
            max_image_pixels=0,  # images with more pixels are skipped (0: $DGMR_MAX_IMAGE_PIXELS or 178,956,970)
        )
    )
    c.export_every = 0  # also write the student as workdir/models/step_<N> every N steps (0: only at the end)
    c.export_ema = False  # export the EMA weights (needs optim.ema_decay > 0) instead of the trained ones
    c.peak_flops = 0.0  # per-chip peak x chips; 0 hides the MFU estimate
    c.log_indices = False  # write each step's record indices to seen.jsonl (tests of data order)
    # seconds one storage call (a checkpoint save or restore, a log or run.json write, a model export) may take:
    # past it, or when storage fails, the run stops in one line with exit code 4 (0: off; dgmr_jax.core.storage)
    c.storage_timeout_s = 300
    # in-loop evaluation of the student (dgmr_jax.eval.in_loop): dicts or "KIND:DATA", e.g. ["knn:mnist5k"]
    c.evals = []
    c.eval_best = ""  # the metric whose best step best.json records (default: the first eval's main metric)
    return c
