"""Distillation step throughput: our jitted step vs the same step in PyTorch eager, and FLOP/s vs matmul peak.

    python benchmarks/distill_step.py [--batch 32] [--steps 10] [--arch vit_small_patch16_224] [--dtype float32]

Teacher: the arch (random init, no download); student: its prune1 (MLP hidden = width). One step =
teacher forward + student forward/backward + AdamW update. Both sides use the same threads (all cores).
Model FLOPs per image = 3 x student forward + teacher forward (count_flops). The matmul peak is the best
FLOP/s of the step's own GEMM shapes and a 4096^3 GEMM, under XLA and under PyTorch (MKL); both columns
are printed, since XLA:CPU's GEMMs are the slower ones here. All timings alternate between the contenders.
PyTorch runs in a child process: sharing one process with it slowed our step by about 0.5 s.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import dgmr_jax as dj
from dgmr_jax.core.hostmem import keep_freed_host_memory
from dgmr_jax.core.parallel import host_batch_to_global, make_mesh, tree_shardings
from dgmr_jax.distill.step import make_step
from dgmr_jax.models.vit import logical_axes, param_shapes
from dgmr_jax.train.state import OptimConfig, init_state, jit_step, make_optimizer, state_shardings


def gemm_shapes(arch: str, batch: int) -> list[tuple[int, int, int, int]]:
    """(batch, m, k, n) of the step's matmuls: tokens x width -> qkv / MLP and back (batch 1), the attention's
    per-head scores and weighted sum (batch = images x heads), and a square 4096 GEMM."""
    cfg = dj.models.preset(arch)
    n_tok = cfg.grid**2 + cfg.num_prefix_tokens
    tokens, heads, head_dim = batch * n_tok, batch * cfg.num_heads, cfg.attn_head_dim
    d, hidden = cfg.width, cfg.mlp_hidden[0]
    return [
        (1, tokens, d, 3 * d),
        (1, tokens, 3 * d, d),
        (1, tokens, d, hidden),
        (1, tokens, hidden, d),
        (heads, n_tok, head_dim, n_tok),
        (heads, n_tok, n_tok, head_dim),
        (1, 4096, 4096, 4096),
    ]


def gemm_table(
    shapes: list[tuple[int, int, int, int]], dtype: str, torch_side: TorchWorker | None, rounds: int = 5
) -> dict[str, list[float]]:
    """FLOP/s per (batch, m, k, n) matmul for XLA and, with a torch worker, PyTorch (timed in alternation)."""
    xla_mm = jax.jit(lambda x, y: x @ y)
    out: dict[str, list[float]] = {}
    for shape in shapes:
        a, b = (jnp.ones(s, dtype) for s in _operand_shapes(*shape))
        calls = {"XLA": lambda a=a, b=b: _timed(lambda: xla_mm(a, b).block_until_ready())}
        if torch_side is not None:
            calls["PyTorch"] = lambda shape=shape: torch_side.call("gemm", *shape, dtype)
        for call in calls.values():  # compile / warm up
            call()
        g, m, k, n = shape
        for name, secs in interleaved(calls, rounds, stat=min).items():
            out.setdefault(name, []).append(2 * g * m * k * n / secs)
    return out


def _operand_shapes(g: int, m: int, k: int, n: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Operand shapes of a (g, m, k, n) matmul: 2-D when g is 1, batched over g otherwise."""
    return ((m, k), (k, n)) if g == 1 else ((g, m, k), (g, k, n))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def ours(arch: str, batch: int, dtype: str) -> tuple[Callable[[], None], float]:
    """(one blocking step, compile seconds) of the jitted sharded step on all local devices."""
    teacher_cfg = dj.models.preset(arch, dtype=dtype)
    teacher = dj.models.init_params(teacher_cfg, 0)
    student_cfg, student = dj.prune.prune_mlp(teacher_cfg, teacher, method="l2", mlp_ratio=1.0)
    opt = OptimConfig(base_lr=1e-4, warmup_steps=1, total_steps=1000, global_batch=batch)
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

    def run() -> None:
        nonlocal state
        state, m = step(state, teacher, images)
        m["loss"].block_until_ready()

    return run, compile_s


def _torch():
    """torch (with timm's torchvision shim from tests/conftest.py), or None when not installed."""
    try:
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
        import conftest  # noqa: F401
        import timm  # noqa: F401
        import torch
    except ImportError:
        return None
    return torch


def torch_eager(arch: str, batch: int) -> Callable[[], None] | None:
    """One step of the same distillation in PyTorch eager (timm models), or None without torch/timm."""
    torch = _torch()
    if torch is None:
        return None
    import timm

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
    return step


def _torch_serve(conn, arch: str, batch: int) -> None:
    """Child-process loop: build the PyTorch step, then answer ("step",) and ("gemm", m, k, n, dtype) requests
    with the seconds each took; None ends it."""
    keep_freed_host_memory()  # the same allocator setting as our side
    step = torch_eager(arch, batch)
    conn.send(step is not None)
    if step is None:
        return
    import torch  # installed: torch_eager built the step

    operands = {}
    while (request := conn.recv()) is not None:
        if request[0] == "step":
            conn.send(_timed(step))
            continue
        *shape, dtype = request[1:]
        if tuple(shape) not in operands:
            operands[tuple(shape)] = [torch.ones(s, dtype=getattr(torch, dtype)) for s in _operand_shapes(*shape)]
        a, b = operands[tuple(shape)]
        conn.send(_timed(lambda a=a, b=b: a @ b))


class TorchWorker:
    """The PyTorch contender in its own process, so that neither library's threads or heap slow the other."""

    def __init__(self, conn, process) -> None:
        self.conn, self.process = conn, process

    @classmethod
    def start(cls, arch: str, batch: int) -> TorchWorker | None:
        """Spawn the worker; None when torch/timm are not installed."""
        ctx = multiprocessing.get_context("spawn")
        conn, child = ctx.Pipe()
        process = ctx.Process(target=_torch_serve, args=(child, arch, batch), daemon=True)
        process.start()
        worker = cls(conn, process)
        if not conn.recv():
            worker.close()
            return None
        return worker

    def call(self, *request) -> float:
        """Seconds that one request took in the worker."""
        self.conn.send(request)
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.process.join()


def interleaved(calls: dict[str, Callable[[], float]], rounds: int, stat=np.median) -> dict[str, float]:
    """Seconds per call of each timed call (median, or stat), run in alternation so that drift in the
    machine's speed (shared hosts) hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            times[name].append(call())
    return {name: float(stat(t)) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtype", default="float32", help="student/teacher compute dtype (bfloat16 on GPU/TPU)")
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args()
    keep_freed_host_memory()  # as the CLI does

    cfg = dj.models.preset(args.arch)
    student_cfg = cfg.replace(mlp_hidden=(cfg.width,) * cfg.depth)
    flops_per_step = args.batch * (3 * dj.prune.count_flops(student_cfg) + dj.prune.count_flops(cfg))
    run, compile_s = ours(args.arch, args.batch, args.dtype)
    steps = {"dgmr-jax (jit)": lambda: _timed(run)}
    worker = None if args.no_torch else TorchWorker.start(args.arch, args.batch)
    if worker is not None:
        steps["PyTorch eager"] = lambda: worker.call("step")
    secs = interleaved(steps, args.steps)
    shapes = gemm_shapes(args.arch, args.batch)
    gemms = gemm_table(shapes, args.dtype, worker)
    if worker is not None:
        worker.close()
    peaks = {name: max(v) for name, v in gemms.items()}
    peak = max(peaks.values())

    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, threads: {os.cpu_count()}")
    print(
        f"{args.arch} teacher -> prune1 student, batch {args.batch}, {args.dtype}; model GFLOP/step "
        f"{flops_per_step / 1e9:.1f}\n"
    )
    print("| matmul (batch x) m x k x n | " + " | ".join(f"{name} GFLOP/s" for name in gemms) + " |")
    print("|---" * (len(gemms) + 1) + "|")
    for i, (g, m, k, n) in enumerate(shapes):
        label = f"{m} x {k} x {n}" if g == 1 else f"{g} x {m} x {k} x {n}"
        print(f"| {label} | " + " | ".join(f"{v[i] / 1e9:.0f}" for v in gemms.values()) + " |")
    print(f"\nmatmul peak (best of the above): {peak / 1e9:.0f} GFLOP/s; XLA's own: {peaks['XLA'] / 1e9:.0f}\n")
    print("| implementation | s/step | images/s | GFLOP/s | % of matmul peak | % of XLA's GEMM peak |")
    print("|---|---|---|---|---|---|")
    for name, s in secs.items():
        rate = flops_per_step / s
        print(
            f"| {name} | {s:.3f} | {args.batch / s:.1f} | {rate / 1e9:.1f} | {100 * rate / peak:.1f}% | "
            f"{100 * rate / peaks['XLA']:.1f}% |"
        )
    print(f"\ncompile: {compile_s:.1f} s")
    if "PyTorch eager" in secs:
        print(f"speed-up over PyTorch eager: {secs['PyTorch eager'] / secs['dgmr-jax (jit)']:.2f}x")


if __name__ == "__main__":
    main()
