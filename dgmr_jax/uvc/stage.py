"""`dgmr-jax uvc`: a UVC search of a model directory in the training core, then extraction to a slim model.

The search is a task of the training core (`SearchTask`): a teacher-student run whose state also holds the
counts, gate logits and duals, resumable from its workdir like any run. At the end the deterministic plan is
extracted, repaired onto the budget, sliced out of the searched weights and written as a model directory with a
report (per-layer table, R and z curves).
Post-training is `dgmr-jax distill` with that directory as the student.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import jax
import ml_collections
import numpy as np

from dgmr_jax.core.errors import UserError
from dgmr_jax.core.parallel import to_host
from dgmr_jax.core.paths import PathLike, as_path
from dgmr_jax.core.plots import pyplot, save_png
from dgmr_jax.data.open import spec_kind
from dgmr_jax.io.model_dir import check_new_dir, save_model
from dgmr_jax.io.open import LayerSource, open_model
from dgmr_jax.models.config import ModelConfig
from dgmr_jax.models.preprocess import Preprocess
from dgmr_jax.models.slim import slice_units
from dgmr_jax.prune.report import write_unit_report
from dgmr_jax.train import run as run_lib
from dgmr_jax.train.logs import read_rows
from dgmr_jax.train.task import LoopHooks, TaskStep
from dgmr_jax.uvc.config import SearchConfig, check_budget, with_search
from dgmr_jax.uvc.extract import SELECT, Extraction, extract
from dgmr_jax.uvc.search import check_teacher, init_search_state, make_optimizers, make_search_step


def search_config(config: ml_collections.ConfigDict) -> SearchConfig:
    """The UVC search of a recipe: its config.uvc block, with the run's own optimizer and distillation settings."""
    u = config.uvc
    fields = {k: v for k, v in u.items() if k not in ("budget", "select")}
    fields.update(gate_init=tuple(u.gate_init), z_lr=tuple(tuple(p) for p in u.z_lr))
    d = config.distill
    return SearchConfig(
        budget=u.budget,
        weights=run_lib.optim_config(config),
        tap=d.tap,
        cls_coef=d.cls_coef,
        feat_coef=d.feat_coef,
        **fields,
    )


class SearchTask:
    """A UVC search of a model directory (teacher and starting student alike) under a FLOPs budget."""

    name = "uvc search"
    shown = ("loss", "ratio_hard", "z", "lr", "images_per_s", "mfu")

    def check(self, config: ml_collections.ConfigDict) -> None:
        if config.export_every or config.export_ema:
            raise UserError(
                "a UVC search exports its slim model by extraction (`dgmr-jax uvc`): drop --export-every/--ema"
            )
        if config.evals or config.eval_every or config.eval_best:
            raise UserError("a UVC search has no student to evaluate in the loop: evaluate the extracted model instead")
        if config.student.get("scan_layers"):
            raise UserError(
                "a UVC search masks each layer's units of its student, which runs unscanned: drop "
                "--config.student.scan_layers (--config.teacher.scan_layers=true still scans the teacher)"
            )

    def signature(self, config: ml_collections.ConfigDict) -> dict[str, Any]:
        """A search's state holds counts and duals of its settings: another budget cannot resume it."""
        return {"uvc": {k: _jsonable(v) for k, v in config.uvc.items()}}

    def student(
        self, config: ml_collections.ConfigDict, teacher: LayerSource
    ) -> tuple[ModelConfig, LayerSource, dict[str, Any]]:
        """The model directory searched (the teacher's own weights, opened as the starting student)."""
        source = open_model(config.student.model_dir)
        return source.cfg, source, source.meta

    def student_config(self, config: ml_collections.ConfigDict, teacher_cfg: ModelConfig) -> ModelConfig:
        """The searched model directory's config, which must fit the teacher's distillation tensors."""
        cfg, model_dir = open_model(config.student.model_dir).cfg, config.student.model_dir
        check_teacher(cfg, teacher_cfg, search_config(config), (model_dir, run_lib.teacher_spec(config.teacher)))
        return cfg

    def make_step(
        self, config: ml_collections.ConfigDict, teacher_cfg: ModelConfig, student_cfg: ModelConfig
    ) -> TaskStep:
        scfg = search_config(config)
        tx = make_optimizers(student_cfg, scfg)
        search = make_search_step(student_cfg, scfg, tx, teacher_cfg)
        key = jax.random.PRNGKey(config.data.seed)

        def step(state, teacher, images):  # this step's Gumbel noise from the step number: resumes draw the same
            return search(state, teacher, images, jax.random.fold_in(key, state.step))

        return TaskStep(tx, functools.partial(init_search_state, student_cfg, scfg=scfg, optimizers=tx), step)

    def hooks(self, run: run_lib.Run) -> LoopHooks:
        return LoopHooks()

    def finish(self, run: run_lib.Run, state: Any, step: int) -> None:
        """A search's product is its extraction (`run_uvc`), not the full-size weights."""
        return None


def _jsonable(v: Any) -> Any:
    """JSON's view of a config value (tuples become lists), so a signature compares equal after a round trip."""
    return [_jsonable(x) for x in v] if isinstance(v, (tuple, list)) else v


def uvc_config(
    config: ml_collections.ConfigDict,
    model: str,
    budget: float,
    train_spec: str,
    steps: int,
    select: str | None = None,
    no_skip: bool = False,
) -> ml_collections.ConfigDict:
    """`config` set up to search `model` (teacher and starting student alike) on `train_spec` for `steps` steps;
    `select` (default: the recipe's uvc.select) and `no_skip` (widths only) override the recipe."""
    check_budget(budget)
    config = with_search(config)
    select = select or config.uvc.select
    if select not in SELECT:
        raise UserError(f"--select must be one of {', '.join(SELECT)}, got {select!r}")
    if select == "taylor":
        raise UserError("--select taylor needs per-layer scores; use dgmr_jax.uvc.extract(..., scores=) in Python")
    if steps <= 0:
        raise UserError(f"--steps must be > 0, got {steps}")
    kind, path = spec_kind(train_spec)
    config.teacher.model_dir = config.student.model_dir = str(model)
    config.data.update(kind=kind, path=path)
    config.optim.total_steps = steps
    config.uvc.update(budget=budget, select=select)
    if no_skip:
        config.uvc.search_blocks = False
    return config


def run_uvc(config: ml_collections.ConfigDict, workdir: PathLike, out: PathLike) -> dict[str, Any] | None:
    """Search (resuming from `workdir`), extract, repair, slice, write `out`; None when the run was preempted."""
    check_new_dir(out)
    source = open_model(config.student.model_dir)
    search_config(config).resolve(source.cfg)  # bad budgets and settings fail before the models load
    result = run_lib.run_task(SearchTask(), config, workdir)
    if result.loop.reason != "done":
        return None
    state = to_host(result.loop.state)  # whole arrays on every host
    cfg = source.cfg
    teacher = source.load() if config.uvc.select != "uvc" else None  # DGMR selects on the original fc1
    ext = extract(
        cfg,
        state.params,
        state.vars,
        config.uvc.budget,
        select=config.uvc.select,
        teacher_params=teacher,
        seed=config.data.seed,
        no_skip=not config.uvc.search_blocks,
    )
    slim_cfg, slim, kept = slice_units(cfg, state.params, ext.plan)
    record = {
        "budget": config.uvc.budget,
        "ratio_searched": ext.ratio_searched,
        "ratio": ext.ratio,
        "blocks": [int(i) for i in kept],
        "select": config.uvc.select,
        "search": {"workdir": str(as_path(workdir)), "step": result.step},
    }
    meta = {k: v for k, v in source.meta.items() if k != "distilled"}
    meta["preprocess"] = Preprocess.from_meta(source.meta, cfg.name).to_meta(cfg.img_size)
    save_model(out, slim_cfg, slim, **meta, uvc=record)
    if jax.process_index() != 0:
        return {"ext": ext, "slim_cfg": slim_cfg, "report": None, "steps": result.step}
    report = write_report(out, cfg, slim_cfg, ext, kept, as_path(workdir) / "metrics.jsonl")
    print(ext.summary())
    return {"ext": ext, "slim_cfg": slim_cfg, "report": report, "steps": result.step}


def write_report(
    out: PathLike, cfg: ModelConfig, slim_cfg: ModelConfig, ext: Extraction, kept: list[int], metrics: PathLike
) -> dict[str, Any]:
    """prune_report.md / .json (costs; per layer heads, value widths, MLP widths, skipped blocks), uvc_report.json
    (budget, ratios before and after the repair, what it moved) and uvc_curves.png (R against the budget, and z,
    per logged step)."""
    out = as_path(out)
    info = write_unit_report(out, cfg, slim_cfg, kept, method="uvc")
    search = {
        "budget": ext.budget,
        "ratio_searched": ext.ratio_searched,
        "ratio": ext.ratio,
        "repair": {
            "units_removed": ext.removed,
            "units_restored": ext.restored,
            "blocks_moved": ext.blocks_moved,
            "heads_moved": ext.heads_moved,
        },
    }
    (out / "uvc_report.json").write_text(json.dumps(search, indent=2))
    md = out / "prune_report.md"
    md.write_text(f"{md.read_text()}\n{ext.summary()}\n")  # rewritten, not appended: gs:// cannot append
    _plot_curves(as_path(metrics), out / "uvc_curves.png", ext.budget)
    return {**info, **search}


def _plot_curves(metrics: Any, path: Any, budget: float) -> None:
    """uvc_curves.png from the search's metrics.jsonl (nothing without it)."""
    if metrics.exists():
        save_png(search_curves_figure(read_rows(metrics), budget), path)


def search_curves_figure(rows: list[dict[str, Any]], budget: float) -> Any:
    """The deterministic FLOPs ratio against the budget, and the dual z, over the search's logged steps."""
    rows = [r for r in rows if "ratio_hard" in r]  # training rows, not evaluations
    steps = np.array([r["step"] for r in rows])
    fig, (ax_r, ax_z) = pyplot().subplots(1, 2, figsize=(10, 4.2))
    ax_r.plot(steps, [r["ratio_hard"] for r in rows], label="R (argmax gates, rounded counts)")
    ax_r.plot(steps, [r["ratio"] for r in rows], alpha=0.5, label="R (sampled gates)")
    ax_r.axhline(budget, color="k", ls="--", lw=1, label=f"budget {budget:g}")
    ax_r.set(xlabel="step", ylabel="FLOPs ratio", title="Resource ratio")
    ax_r.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, fontsize="small")  # below: over no line
    ax_z.plot(steps, [r["z"] for r in rows])
    ax_z.set(xlabel="step", ylabel="z", title="Dual of the FLOPs constraint")
    fig.tight_layout()
    return fig
