"""`dgmr-jax eval`: kNN (DINOv2 protocol) and linear-probe accuracy of a model directory on labeled images, and,
with a CLIP text tower, zero-shot accuracy and image-text retrieval recall: a driver over the evaluators of
eval/evaluators.py (the ones in-loop evaluation runs), which turns their metrics into the result JSON."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import jax

from dgmr_jax.core.errors import UserError
from dgmr_jax.eval.evaluators import DIGITS, Context, EvalSpec, Evaluator, make_evaluator, run_all
from dgmr_jax.io.open import open_model

__all__ = ["DIGITS", "ClipEval", "evaluate", "offline_specs"]


@dataclasses.dataclass(frozen=True)
class ClipEval:
    """What zero-shot / retrieval evaluation needs: the open_clip checkpoint or transformers CLIPModel /
    SiglipModel directory whose text tower (the original: DGMR prunes only the vision tower) embeds prompts and
    captions, and which measurements to run."""

    checkpoint: str
    text_arch: str | None = None  # an open_clip checkpoint's text preset or TextConfig .json; default: the model's
    zeroshot: bool = False  # classify the test images by prompts built from their class names
    retrieval: str | None = None  # jsonl of {"image": path, "captions": [...]}, paths relative to the file
    classnames: str | None = None  # file: one class name per line, in sorted class-folder order
    templates: str | None = None  # file: one prompt per line, "{}" standing for the class name
    bpe_vocab: str | None = None  # CLIP's BPE .txt.gz or a transformers dir (default: a CLIPModel's, open_clip's)

    def __post_init__(self) -> None:
        if not (self.zeroshot or self.retrieval):
            raise UserError("a CLIP text tower is only used with --zeroshot and/or --retrieval FILE")


def offline_specs(train: str, test: str, batch: int, l2: float, clip: ClipEval | None) -> list[EvalSpec]:
    """The evaluations `dgmr-jax eval` runs: kNN and linear probe (unless train="none"), zero-shot, retrieval."""
    if train == "none" and clip is None:
        raise UserError("--train none leaves nothing to evaluate: add --zeroshot or --retrieval (with --clip-text)")
    specs = []
    if train != "none":
        specs += [EvalSpec(kind, train=train, test=test, batch=batch, l2=l2) for kind in ("knn", "linear_probe")]
    if clip:
        text = dict(clip_text=str(clip.checkpoint), text_arch=clip.text_arch or "", bpe_vocab=clip.bpe_vocab or "")
        if clip.zeroshot:
            names = dict(classnames=clip.classnames or "", templates=clip.templates or "")
            specs.append(EvalSpec("zeroshot", test=test, batch=batch, **names, **text))
        if clip.retrieval:
            specs.append(EvalSpec("retrieval", retrieval=clip.retrieval, batch=batch, **text))
    return specs


def _warn_skipped(result: dict[str, Any]) -> Any:
    """on_skipped for Context: names a split's unreadable images in result["skipped_files"] and a warning."""

    def on_skipped(split: str, skipped: list[str]) -> None:
        result["skipped_files"][split] = result["skipped_files"].get(split, []) + skipped
        if skipped:
            shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
            print(
                f"eval: warning: skipped {len(skipped)} unreadable {split} image{'s' * (len(skipped) > 1)}, "
                f"left out of the results: {shown}",
                file=sys.stderr,
            )

    return on_skipped


def _announce(ctx: Context, img_size: int | None) -> None:
    counts = " + ".join(f"{len(images.source)} {images.split}" for images in ctx.opened)
    hint = " (use --img-size to go faster on CPU)" if img_size is None and jax.default_backend() == "cpu" else ""
    print(f"eval: embedding {counts} images at {ctx.img_size} px{hint}", file=sys.stderr)


def _by_k(metrics: dict[str, float], prefix: str) -> dict[int, float]:
    return {int(name[len(prefix) :]): v for name, v in metrics.items() if name.startswith(prefix)}


def _report(result: dict[str, Any], evaluators: dict[str, Evaluator], metrics: dict[str, dict]) -> dict[str, Any]:
    """The result JSON of `dgmr-jax eval` from the evaluators' metrics and details."""
    labeled = evaluators.get("knn") or evaluators.get("zeroshot")
    if labeled is not None:
        result.update({k: labeled.details[k] for k in ("classes", "test_images")})
    if "knn" in metrics:
        result["knn"] = _by_k(metrics["knn"], "knn@")
        result["linear_probe"] = {
            **metrics["linear_probe"],
            "train_top1": evaluators["linear_probe"].details["train_top1"],
        }
        result["train_images"] = evaluators["knn"].details["train_images"]
    text = evaluators.get("zeroshot") or evaluators.get("retrieval")
    if text is not None:
        result["text_arch"] = text.text.cfg.name
    if "zeroshot" in metrics:
        result["zeroshot"] = {**metrics["zeroshot"], "templates": evaluators["zeroshot"].details["templates"]}
    if "retrieval" in metrics:
        ways = {way: _by_k(metrics["retrieval"], f"{way}_R@") for way in ("image_to_text", "text_to_image")}
        result["retrieval"] = {**ways, **evaluators["retrieval"].details}
    return result


def evaluate(
    model_dir: str,
    train: str,
    test: str,
    img_size: int | None = None,
    batch: int = 64,
    l2: float = 1e-3,
    clip: ClipEval | None = None,
) -> dict[str, Any]:
    """Pooled features of train and test images -> kNN top-1 per k and linear-probe top-1 (skipped with
    train="none"); with `clip`, zero-shot top-k on the test images and retrieval recall@k. Every input is
    checked, and the text tower loaded, before any image is embedded. Images that do not read or decode are
    left out (with their labels, or captions), named in a warning and in result["skipped_files"][split]; so
    are the bad pairs of a retrieval manifest (a missing image, a line without captions)."""
    model = open_model(model_dir)
    specs = offline_specs(train, test, batch, l2, clip)
    size = img_size or model.cfg.img_size
    result: dict[str, Any] = {"img_size": size, "skipped_files": {}}
    ctx = Context(model.cfg, model.meta, size, progress=True, on_skipped=_warn_skipped(result))
    evaluators = {spec.kind: make_evaluator(spec, ctx) for spec in specs}
    if "retrieval" in evaluators:
        result["skipped_files"]["retrieval"] = [bad.name for bad in evaluators["retrieval"].pairs.bad]
    params = model.load()
    _announce(ctx, img_size)
    metrics = dict(zip(evaluators, run_all(list(evaluators.values()), ctx, params), strict=True))
    return _report(result, evaluators, metrics)
