"""Accelerator benchmark of the bf16 distillation step: images/s and MFU, per attention implementation.

On one GPU (H100/H200; ~6 compiles, a few minutes in all):

    python benchmarks/device_step.py --out device_step.json

On a TPU VM the same command compares einsum with jax.nn.dot_product_attention (XLA there; no cuDNN).
On CPU, to check that the script works end to end (about a minute, figures meaningless):

    JAX_PLATFORMS=cpu python benchmarks/device_step.py --tiny

The step is the trainer's own (`trainer.model_configs` + `trainer.build_step`: teacher forward, student
forward/backward, AdamW), jitted with the trainer's shardings over all local devices (data parallel), on
random-init weights created directly on the devices (no host copy). Workloads:

  vit_l14  OpenCLIP ViT-L/14 teacher (bf16) and its prune1 student (MLP hidden = width 1024), 224 px;
           student bf16 compute with float32 master params (base_config), no remat; --depth N shortens both.
  eva_e    EVA02-CLIP-E layers: width 1792, 16 heads of 112, MLP 15360 -> 1792 (prune1), post-norm, the first
           --layers N of 64 (default 4, one device); pure bf16, remat and the raw tap as
           configs/eva02_clip_e_prune1.py.

Attention implementations (ModelConfig.attention): einsum (the default path), dot_product_attention
(jax.nn.dot_product_attention with JAX's default implementation, which is XLA in current JAX) and cudnn
(implementation="cudnn": cuDNN flash attention; NVIDIA GPUs only, listed by default there). The "kernel"
column says whether the compiled step holds cuDNN's fused attention custom call.

MFU = (3 x student + teacher forward FLOPs per image, `prune.cost.count_flops`) x images/s / (peak x devices),
peak = dense bf16 TFLOP/s per device from the table below by device kind, or --peak-tflops. A case that fails
(out of memory, an unsupported kernel) is reported with its error and the rest still run; with --out the JSON
is rewritten after every case, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
import traceback
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from dgmr_jax.core.parallel import batch_sharding, check_batch, make_mesh
from dgmr_jax.distill.defaults import base_config
from dgmr_jax.distill.trainer import build_step, model_configs
from dgmr_jax.models.config import ATTENTION
from dgmr_jax.models.cost import count_flops
from dgmr_jax.models.vit import init_params
from dgmr_jax.train.state import init_state

# dense bf16 TFLOP/s per device, by a substring of jax's device_kind (first match wins)
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),  # also GH200
    ("H800", 989.0),
    ("A100", 312.0),
    ("L4", 121.0),
    ("TPU v5 lite", 197.0),  # v5e
    ("TPU v5e", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v5", 459.0),
    ("TPU v6 lite", 918.0),  # v6e (Trillium)
    ("TPU v6e", 918.0),
    ("TPU v4", 275.0),
)

WORKLOADS: dict[str, dict[str, Any]] = {
    "vit_l14": dict(
        arch="ViT-L-14", family="open_clip", depth=24, batch=128, param_dtype="float32", remat=False, tap="output"
    ),
    "eva_e": dict(
        arch="eva02_enormous_patch14_clip_224",
        family="eva_clip",
        depth=4,
        batch=40,
        param_dtype="bfloat16",
        remat=True,
        tap="raw",
    ),
}

TINY = dict(depth=1, layers=1, img_size=56, batch=2, steps=2, warmup=1)


def peak_tflops(device_kind: str) -> float | None:
    for key, tflops in PEAK_TFLOPS:
        if key.lower() in device_kind.lower():
            return tflops
    return None


def recipe(workload: str, args: argparse.Namespace) -> Any:
    """The distillation config of a workload: base_config() with the teacher preset and the flags' overrides."""
    w = WORKLOADS[workload]
    c = base_config()
    depth = args.layers if workload == "eva_e" else args.depth
    overrides = {"depth": depth or w["depth"]}
    if args.img_size:
        overrides["img_size"] = args.img_size
    c.teacher.update(arch=w["arch"], family=w["family"], dtype="bfloat16", random_init=True)
    c.teacher.arch_overrides.update(overrides)
    c.student.update(
        mlp_ratio=1.0,
        dtype="bfloat16",
        param_dtype=args.param_dtype or w["param_dtype"],
        remat=w["remat"] if args.remat is None else args.remat,
    )
    c.distill.tap = w["tap"]
    c.global_batch = args.batch or w["batch"]
    c.optim.update(warmup_steps=1, total_steps=1000)
    return c


def _init_on_devices(step, config, mesh):
    """(state, teacher, images) created by jitted functions straight into the step's shardings. The key is an
    argument, not a constant: XLA would otherwise try to constant-fold the random init."""
    cast = lambda tree, dtype: jax.tree_util.tree_map(lambda x: x.astype(dtype), tree)  # noqa: E731
    teacher_dtype, student_dtype = config.teacher.dtype, config.student.param_dtype
    ema = step.state_shapes.ema is not None
    img = step.student_cfg.img_size
    k_teacher, k_student, k_images = jax.random.split(jax.random.PRNGKey(0), 3)
    teacher = jax.jit(
        lambda key: cast(init_params(step.teacher_cfg, key), teacher_dtype), out_shardings=step.teacher_sh
    )(k_teacher)
    state = jax.jit(
        lambda key: init_state(cast(init_params(step.student_cfg, key), student_dtype), step.optimizer, ema),
        out_shardings=step.state_sh,
    )(k_student)
    images = jax.jit(
        lambda key: jax.random.normal(key, (config.global_batch, img, img, 3), jnp.float32),
        out_shardings=batch_sharding(mesh),
    )(k_images)
    return state, teacher, images


def run_case(workload: str, attention: str, args: argparse.Namespace, mesh, peak: float | None) -> dict[str, Any]:
    config = recipe(workload, args)
    check_batch(config.global_batch, mesh)
    teacher_cfg, model_cfg = model_configs(config)
    teacher_cfg = teacher_cfg.replace(attention=attention, scan_layers=args.scan_layers)
    model_cfg = model_cfg.replace(attention=attention, scan_layers=args.scan_layers)
    step = build_step(config, mesh, teacher_cfg, model_cfg)
    img = step.student_cfg.img_size
    row: dict[str, Any] = {
        "workload": workload,
        "attention": attention,
        "teacher": f"{teacher_cfg.name} depth {teacher_cfg.depth}",
        "student_mlp_hidden": step.student_cfg.mlp_hidden[0],
        "batch": config.global_batch,
        "img_size": img,
        "param_dtype": config.student.param_dtype,
        "remat": config.student.remat,
        "tap": config.distill.tap,
    }
    state, teacher, images = _init_on_devices(step, config, mesh)
    start = time.perf_counter()
    compiled = step.fn.lower(state, teacher, images).compile()
    row["compile_s"] = time.perf_counter() - start
    row["kernel"] = "cuDNN fused attention" if "cudnn$fmha" in compiled.as_text() else "XLA"
    mem = compiled.memory_analysis()  # per device, from the compiler: donated state aliases its outputs
    if mem is not None:
        total = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
        row["memory_gib"] = total / 2**30
    for _ in range(max(args.warmup, 1)):
        state, metrics = compiled(state, teacher, images)
    jax.block_until_ready((state, metrics))
    start = time.perf_counter()
    for _ in range(max(args.steps, 1)):
        state, metrics = compiled(state, teacher, images)
    jax.block_until_ready((state, metrics))
    step_s = (time.perf_counter() - start) / max(args.steps, 1)
    flops_per_image = 3 * count_flops(step.student_cfg, img) + count_flops(step.teacher_cfg, img)
    row.update(
        step_s=step_s,
        images_per_s=config.global_batch / step_s,
        model_tflops=flops_per_image * config.global_batch / step_s / 1e12,
        flops_per_image=flops_per_image,
        loss=float(metrics["loss"]),
    )
    if peak:
        row["mfu"] = row["model_tflops"] / (peak * len(mesh.devices.flat))
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    cols = ["workload", "attention", "kernel", "batch", "step s", "images/s", "model TFLOP/s", "MFU", "compile s"]
    cols.append("memory GiB")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if "error" in r:
            cells = [r["workload"], r["attention"], f"failed: {r['error'][:100]}"] + [""] * (len(cols) - 3)
        else:
            cells = [
                r["workload"],
                r["attention"],
                r["kernel"],
                str(r["batch"]),
                f"{r['step_s']:.4f}",
                f"{r['images_per_s']:.1f}",
                f"{r['model_tflops']:.2f}",
                f"{100 * r['mfu']:.1f}%" if "mfu" in r else "n/a",
                f"{r['compile_s']:.0f}",
                f"{r['memory_gib']:.1f}" if "memory_gib" in r else "n/a",
            ]
        lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="vit_l14,eva_e", help=f"comma list of {', '.join(WORKLOADS)}")
    parser.add_argument(
        "--attention", help=f"comma list of {', '.join(ATTENTION)} (default: all on GPU, without cudnn elsewhere)"
    )
    parser.add_argument("--batch", type=int, help="global batch (default: vit_l14 128, eva_e 40)")
    parser.add_argument("--steps", type=int, help="timed steps (default 10)")
    parser.add_argument("--warmup", type=int, help="untimed steps after the compile (default 3, at least 1)")
    parser.add_argument("--depth", type=int, help="vit_l14 teacher/student depth (default 24, the full model)")
    parser.add_argument("--layers", type=int, help="eva_e layers (default 4 of 64)")
    parser.add_argument("--img-size", type=int, help="image size (default: the preset's, 224)")
    parser.add_argument("--param-dtype", choices=("float32", "bfloat16"), help="student master params")
    parser.add_argument("--remat", type=lambda s: s.lower() in ("1", "true", "yes"), help="student remat on/off")
    parser.add_argument("--scan-layers", action="store_true", help="nn.scan over the layer stacks (faster compile)")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak per device (default: by device kind)")
    parser.add_argument("--tiny", action="store_true", help=f"CPU check of the script: {TINY} unless given")
    parser.add_argument("--out", type=Path, help="write the rows and the device description as JSON")
    args = parser.parse_args()
    defaults = TINY if args.tiny else dict(depth=None, layers=None, img_size=None, batch=None, steps=10, warmup=3)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    device = jax.devices()[0]
    on_gpu = jax.default_backend() == "gpu"
    attentions = args.attention.split(",") if args.attention else [a for a in ATTENTION if on_gpu or a != "cudnn"]
    for a in attentions:
        if a not in ATTENTION:
            parser.error(f"--attention {a!r}: choose from {', '.join(ATTENTION)}")
    workloads = args.workloads.split(",")
    for w in workloads:
        if w not in WORKLOADS:
            parser.error(f"--workloads {w!r}: choose from {', '.join(WORKLOADS)}")
    peak = args.peak_tflops or peak_tflops(device.device_kind)
    mesh = make_mesh()
    report = {
        "date": datetime.date.today().isoformat(),
        "device_kind": device.device_kind,
        "platform": device.platform,
        "devices": len(mesh.devices.flat),
        "peak_tflops_per_device": peak,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rows": [],
    }
    print(f"{report['devices']} x {device.device_kind} ({device.platform}), peak {peak or 'unknown'} TFLOP/s each")
    for workload in workloads:
        for attention in attentions:
            print(f"{workload} / {attention} ...", flush=True)
            try:
                row = run_case(workload, attention, args, mesh, peak)
            except Exception as err:  # OOM, unsupported kernel: record it and go on
                traceback.print_exc()
                row = {"workload": workload, "attention": attention, "error": f"{type(err).__name__}: {err}"}
            report["rows"].append(row)
            if args.out:
                args.out.write_text(json.dumps(report, indent=2))
    print(markdown(report["rows"]))


if __name__ == "__main__":
    main()
