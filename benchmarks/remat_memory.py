"""Per-layer memory of the distillation step with and without remat, from the compiler (`dgmr-jax plan`).

    python benchmarks/remat_memory.py [--topology v5p:2x2x1 | --devices 4] [--layers 4 8 16] [--batch-per-chip 32]

A ViT-B/16 teacher (bf16, random init) and its prune1 student at 224 px are compiled at several depths;
the slope of temp bytes over depth is the per-layer memory. With remat the policy keeps only each block's
input, so the predicted slope is batch x tokens x width x bytes; without remat every block's activations
stay live. TPU targets use libtpu's compiler (`.[tpu-plan]`); --devices compiles for fake CPU devices with
the flags `dgmr-jax plan` sets (a CPU estimate, not a TPU figure). Each depth runs `dgmr-jax plan` in a
fresh process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def plan(target: list[str], depth: int, remat: bool, batch: int, out: Path) -> dict:
    """One `dgmr-jax plan` run in its own process (fresh XLA flags); its JSON row."""
    argv = [sys.executable, "-m", "dgmr_jax.cli", "plan", "--config", str(ROOT / "configs" / "cpu_tiny.py"), *target]
    argv += [
        "--config.teacher.arch=vit_base_patch16_224",
        f"--config.teacher.arch_overrides={{'depth': {depth}}}",
        "--config.teacher.dtype=bfloat16",
        "--config.student.dtype=bfloat16",
        f"--config.student.remat={remat}",
        f"--config.global_batch={batch}",
        "--out",
        str(out),
    ]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(out.read_text())[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--topology", default="v5p:2x2x1")
    parser.add_argument("--devices", type=int, help="fake CPU devices instead of a TPU topology")
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--batch-per-chip", type=int, default=32)
    args = parser.parse_args()
    target = ["--devices", str(args.devices)] if args.devices else ["--topology", args.topology]
    print("| remat | layers | temp MiB | total MiB | compile s | slope MiB/layer | predicted |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for remat in (False, True):
            rows = []
            for depth in args.layers:
                chips = args.devices or int(np.prod([int(d) for d in args.topology.split(":")[1].split("x")]))
                rows.append(plan(target, depth, remat, args.batch_per_chip * chips, Path(tmp) / f"{remat}_{depth}"))
            temps = np.array([r["temp"] for r in rows]) / 2**20
            slope = np.polyfit(args.layers, temps, 1)[0]
            predicted = args.batch_per_chip * 197 * 768 * 2 / 2**20 if remat else float("nan")
            for depth, r, t in zip(args.layers, rows, temps, strict=True):
                cells = [str(remat), str(depth), f"{t:.1f}", f"{r['total'] / 2**20:.1f}", f"{r['compile_s']:.0f}"]
                print("| " + " | ".join(cells) + f" | {slope:.1f} | {predicted:.1f} |")


if __name__ == "__main__":
    main()
