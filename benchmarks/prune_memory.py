"""Peak host memory of streamed pruning: synthetic EVA02-CLIP-E-shaped bf16 checkpoints of 4 and 16 layers.

    python benchmarks/prune_memory.py [--layers 4 16] [--workdir /tmp/dgmr_prune_memory]

Each checkpoint is pruned to prune1 (hidden 1792) by `dgmr-jax prune` in a fresh process, which reports
its own peak RSS (VmHWM, Linux). Streaming holds one layer plus the output, so the 16-layer peak
may exceed the 4-layer peak by at most one float32 EVA-E fc1 (110 MB) plus the extra output.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

from dgmr_jax.io.checkpoint_io import save_safetensors
from dgmr_jax.io.keymaps import rules
from dgmr_jax.models.cost import count_params
from dgmr_jax.models.presets import preset
from dgmr_jax.models.tree import flatten
from dgmr_jax.models.vit import param_shapes

FC1_F32_MB = 1792 * 15360 * 4 / 1e6


def write_checkpoint(path: Path, depth: int, seed: int = 0) -> Path:
    """A timm-layout EVA-E vision tower of `depth` layers with random bf16 weights, and its config."""
    cfg = preset("eva02_enormous_patch14_clip_224", depth=depth)
    rng = np.random.default_rng(seed)
    tensors = {}
    shapes = flatten(param_shapes(cfg))
    for rule in rules(cfg, "timm"):  # torch shapes: flax shapes through the rule's layout
        (flax_path,) = rule.flax
        shape = tuple(shapes[flax_path].shape)
        if rule.hook == "linear":
            shape = shape[::-1]
        elif rule.hook == "conv":
            shape = (shape[3], shape[2], shape[0], shape[1])
        (name,) = rule.torch
        tensors[name] = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    save_safetensors(path, tensors)
    config = path.with_suffix(".json")
    config.write_text(cfg.to_json())
    return config


# VmHWM is the peak RSS of this process image alone. getrusage's ru_maxrss is not: a forked child inherits
# the parent's high-water mark, and this parent held a whole synthetic checkpoint while writing it.
_CHILD = (
    "import re, sys\n"
    "from dgmr_jax.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "hwm = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)\n"
    "print('PEAK_RSS_KB', hwm, file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def run(checkpoint: Path, config: Path, out: Path) -> tuple[float, float]:
    """(peak RSS in MB of that process alone, seconds) of one `dgmr-jax prune` run."""
    start = time.perf_counter()
    args = ["prune", "--checkpoint", str(checkpoint), "--arch", str(config), "--mlp-ratio", "1", "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    seconds = time.perf_counter() - start
    peak_kb = int(done.stderr.rsplit("PEAK_RSS_KB", 1)[1].split()[0])
    return peak_kb / 1024, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--workdir", default="/tmp/dgmr_prune_memory")
    args = parser.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rows = []
    for depth in args.layers:
        ckpt = work / f"eva_e_{depth}.safetensors"
        config = write_checkpoint(ckpt, depth)
        out = work / f"pruned_{depth}"
        peak, seconds = run(ckpt, config, out)
        out_mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
        slim = preset("eva02_enormous_patch14_clip_224", depth=depth, hidden=1792)
        rows.append(
            dict(
                layers=depth,
                ckpt_mb=ckpt.stat().st_size / 1e6,
                out_mb=out_mb,
                peak_rss_mb=peak,
                seconds=seconds,
                out_params=count_params(slim),
            )
        )
        ckpt.unlink()
    rows.sort(key=lambda r: r["layers"])
    print("| layers | checkpoint MB | output MB | peak RSS MB | seconds | s/layer |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['layers']} | {r['ckpt_mb']:.0f} | {r['out_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
            f"{r['seconds']:.1f} | {r['seconds'] / r['layers']:.2f} |"
        )
    small, big = rows[0], rows[-1]
    growth = big["peak_rss_mb"] - small["peak_rss_mb"]
    # the output the process holds: pruned params in the checkpoint's dtype (bf16), not the compressed files
    allowed = FC1_F32_MB + 2 * (big["out_params"] - small["out_params"]) / 1e6
    per_layer = (big["seconds"] - small["seconds"]) / (big["layers"] - small["layers"])
    print(
        f"\npeak growth {growth:.0f} MB vs allowed {allowed:.0f} MB (one fp32 fc1 {FC1_F32_MB:.0f} MB + "
        f"output difference): {'OK' if growth <= allowed else 'OVER'}"
    )
    print(f"extrapolated 64-layer time: {small['seconds'] + per_layer * (64 - small['layers']):.0f} s")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
