"""Distillation step throughput: our jitted step vs the same step in PyTorch eager, and FLOP/s vs matmul peak.

    python benchmarks/distill_step.py [--batch 32] [--steps 10] [--arch vit_small_patch16_224] [--dtype float32]

Teacher: the arch (random init, no download); student: its prune1 (MLP hidden = width). One step =
teacher forward + student forward/backward + AdamW update. Both sides use the same threads (all cores).
Model FLOPs per image = 3 x student forward + teacher forward (count_flops); MFU = achieved / measured
matmul peak of this machine (a large float32 or bf16 GEMM in XLA).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import dgmr_jax as dj
from dgmr_jax.distill.step import OptimConfig, init_state, jit_step, make_optimizer, make_step, state_shardings
from dgmr_jax.models.vit import logical_axes, param_shapes
from dgmr_jax.parallel import host_batch_to_global, make_mesh, tree_shardings


def matmul_peak(dtype: str, n: int = 4096, repeats: int = 5) -> float:
    """Best FLOP/s of an n x n x n GEMM under XLA: the machine's practical peak for this dtype."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    best = min(_timed(lambda: f(a, a).block_until_ready()) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def ours(arch: str, batch: int, steps: int, dtype: str) -> tuple[float, float]:
    """(seconds per step, compile seconds) of the jitted sharded step on all local devices."""
    teacher_cfg = dj.models.preset(arch, dtype=dtype)
    teacher = dj.models.init_params(teacher_cfg, 0)
    student_cfg, student = dj.prune.prune_mlp(teacher_cfg, teacher, method="l2", mlp_ratio=1.0)
    opt = OptimConfig(base_lr=1e-4, warmup_steps=1, total_steps=steps + 2, global_batch=batch)
    tx = make_optimizer(opt)
    mesh = make_mesh()
    state = init_state(student, tx, ema=False)
    state_sh = state_shardings(student_cfg, jax.eval_shape(lambda: state), mesh)
    teacher_sh = tree_shardings(logical_axes(teacher_cfg), param_shapes(teacher_cfg), mesh)
    state, teacher = jax.device_put(state, state_sh), jax.device_put(teacher, teacher_sh)
    step = jit_step(make_step(student_cfg, teacher_cfg, tx, opt), mesh, state_sh, teacher_sh)
    images = host_batch_to_global(np.random.default_rng(0).normal(size=(batch, 224, 224, 3)).astype(np.float32), mesh)
    start = time.perf_counter()
    state, m = step(state, teacher, images)
    m["loss"].block_until_ready()
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, m = step(state, teacher, images)
        m["loss"].block_until_ready()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), compile_s


def torch_eager(arch: str, batch: int, steps: int) -> float | None:
    """Seconds per step of the same step in PyTorch eager (timm models), or None without torch/timm."""
    try:
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
        import conftest  # noqa: F401  (torchvision shim for timm)
        import timm
        import torch
    except ImportError:
        return None
    torch.manual_seed(0)
    teacher = timm.create_model(arch, pretrained=False).eval()
    student = timm.create_model(arch, pretrained=False, mlp_ratio=1.0).train()
    optim = torch.optim.AdamW(student.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    x = torch.randn(batch, 3, 224, 224)

    def step():
        with torch.no_grad():
            t = teacher.forward_features(x)
            t_pooled = teacher.forward_head(t, pre_logits=True)
        s = student.forward_features(x)
        s_pooled = student.forward_head(s, pre_logits=True)
        loss = torch.nn.functional.mse_loss(s_pooled, t_pooled) + torch.nn.functional.mse_loss(s[:, 1:], t[:, 1:])
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()

    step()
    return float(np.median([_timed(step) for _ in range(steps)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtype", default="float32", help="student/teacher compute dtype (bfloat16 on GPU/TPU)")
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args()

    cfg = dj.models.preset(args.arch)
    student_cfg = cfg.replace(mlp_hidden=(cfg.width,) * cfg.depth)
    flops_per_step = args.batch * (3 * dj.prune.count_flops(student_cfg) + dj.prune.count_flops(cfg))
    peak = matmul_peak(args.dtype)
    step_s, compile_s = ours(args.arch, args.batch, args.steps, args.dtype)
    torch_s = None if args.no_torch else torch_eager(args.arch, args.batch, args.steps)

    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, threads: {os.cpu_count()}")
    print(
        f"{args.arch} teacher -> prune1 student, batch {args.batch}, {args.dtype}; "
        f"model GFLOP/step {flops_per_step / 1e9:.1f}; matmul peak {peak / 1e9:.1f} GFLOP/s\n"
    )
    print("| implementation | s/step | images/s | GFLOP/s | % of matmul peak |")
    print("|---|---|---|---|---|")
    for name, secs in (("dgmr-jax (jit)", step_s), ("PyTorch eager", torch_s)):
        if secs is None:
            continue
        print(
            f"| {name} | {secs:.3f} | {args.batch / secs:.1f} | {flops_per_step / secs / 1e9:.1f} | "
            f"{100 * flops_per_step / secs / peak:.1f}% |"
        )
    print(f"\ncompile: {compile_s:.1f} s")
    if torch_s:
        print(f"speed-up over PyTorch eager: {torch_s / step_s:.2f}x")


if __name__ == "__main__":
    main()
