"""Launch to first step of `dgmr-jax distill`: unrolled vs scanned layer stacks, cold vs warm compile cache.

    python benchmarks/startup.py [--depth 24] [--out startup.json]

Each cell is one `dgmr-jax distill` process (a deep, narrow ViT-Ti teacher at 32 px, random init; its prune1
student; 8 images, one step, no checkpoint): the wall time from launch until it exits after its first step, and
the compile time it prints. "cold" starts with an empty `--config.compile_cache`, "warm" is the same command
again with the cache the cold run filled. Runs alternate between the layouts. The figures are wall times: on a
shared machine they move with the load, the ratios less so.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "cpu_tiny.py")


def launch(workdir: Path, images: Path, cache: Path, depth: int, scan: bool) -> dict[str, float]:
    """One distill process to its first step: wall seconds and the compile seconds it reports."""
    argv = ["distill", "--config", CONFIG, "--workdir", str(workdir), f"--config.data.path={images}"]
    argv += ["--config.teacher.random_init=true", f"--config.teacher.arch_overrides.depth={depth}"]
    argv += ["--config.optim.total_steps=1", "--config.checkpoint_every=1000", f"--config.compile_cache={cache}"]
    argv += [f"--config.teacher.scan_layers={scan}", f"--config.student.scan_layers={scan}"]
    start = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-m", "dgmr_jax.cli", *argv],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    wall = time.perf_counter() - start
    if run.returncode:
        raise SystemExit(run.stderr[-3000:])
    compiled = re.search(r"compiled in ([\d.]+) s", run.stdout + run.stderr)
    return {"wall_s": wall, "compile_s": float(compiled.group(1)) if compiled else float("nan")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=24)
    p.add_argument("--out", default="")
    args = p.parse_args()
    import numpy as np
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        (tmp / "imgs").mkdir()
        for i in range(8):
            Image.fromarray((rng.random((36, 36, 3)) * 255).astype("uint8")).save(tmp / "imgs" / f"{i}.png")
        rows = {}
        for phase in ("cold", "warm"):
            for scan in (False, True):
                name = "scanned" if scan else "unrolled"
                rows[(name, phase)] = launch(
                    tmp / f"{name}_{phase}", tmp / "imgs", tmp / f"cache_{name}", args.depth, scan
                )
                print(name, phase, rows[(name, phase)], flush=True)
    base = rows[("unrolled", "cold")]["wall_s"]
    print(f"\ndepth {args.depth} (teacher and student), launch to first step on {os.cpu_count()} CPUs\n")
    print("| stack | cache | launch to first step, s | compile, s | vs unrolled cold |")
    print("|---|---|---|---|---|")
    for (name, phase), r in rows.items():
        print(f"| {name} | {phase} | {r['wall_s']:.1f} | {r['compile_s']:.1f} | {base / r['wall_s']:.2f}x |")
    for name in ("unrolled", "scanned"):
        ratio = rows[(name, "cold")]["wall_s"] / rows[(name, "warm")]["wall_s"]
        print(f"{name}: cold / warm = {ratio:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({f"{k[0]}_{k[1]}": v for k, v in rows.items()}, indent=2))


if __name__ == "__main__":
    main()
