"""One evaluator per kind (big_vision's evaluators/common.py style): knn, linear_probe, zeroshot, retrieval.

An evaluator is made once from its `EvalSpec` and a `Context` (the model evaluated, how its features are
taken): its images are opened (and decoded once and kept when the context allows), prompts and captions read
and tokenized, a frozen text tower's classifier or caption embeddings computed. Then `run(params)` scores one
set of vision weights and returns the kind's metrics ({"knn@20": ...}, {"top1": ...}, {"image_to_text_R@1":
...}); `details` holds what the last run counted (images, classes, ...). `dgmr-jax eval` (eval/run.py),
in-loop evaluation (eval/in_loop.py) and the text stage (text_stage/finetune.py) use them unchanged.

The two towers: image features come from `params` (the vision weights evaluated) or are fixed (`Embedded`: a
frozen image tower's features, computed once, as in the text stage); the text side of zeroshot / retrieval is
the frozen tower the evaluator was made with, or the `text_params` given to run (the text tower being trained).
Evaluators run together share `Features`: one pass over each image set for every output key wanted of it.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from jax.sharding import Mesh

from dgmr_jax.core.errors import UserError
from dgmr_jax.core.paths import is_uri
from dgmr_jax.data import EvalBatches, Pairs, decoded_once, open_images, read_manifest, record_name, require_good
from dgmr_jax.data import warn_bad as warn_bad_pairs
from dgmr_jax.eval.features import extract_features
from dgmr_jax.eval.knn import DINOV2_KS, knn_accuracy
from dgmr_jax.eval.linear_probe import linear_probe
from dgmr_jax.eval.zeroshot import (
    RETRIEVAL_KS,
    ZEROSHOT_KS,
    encode_texts,
    retrieval_recall,
    zeroshot_accuracy,
    zeroshot_classifier,
)
from dgmr_jax.io.clip import clip_embedding, open_text_tower
from dgmr_jax.models.config import ModelConfig
from dgmr_jax.models.preprocess import Preprocess
from dgmr_jax.models.text import TextConfig

KINDS = ("knn", "linear_probe", "zeroshot", "retrieval")
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MNIST_TEMPLATES = ("a photo of the number {}.", "a photo of the digit {}.")
FOLDER_TEMPLATES = ("a photo of a {}.",)


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """One evaluation (an entry of config.evals; see eval/in_loop.py for the fields)."""

    kind: str
    train: str = ""
    test: str = ""
    retrieval: str = ""
    clip_text: str = ""
    text_arch: str = ""
    classnames: str = ""
    templates: str = ""
    bpe_vocab: str = ""
    name: str = ""
    batch: int = 64
    l2: float = 1e-3

    def __post_init__(self) -> None:
        where = f"config.evals entry {self.name or self.kind!r}"
        if self.kind not in KINDS:
            raise UserError(f"{where}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind in ("knn", "linear_probe") and not self.train:
            raise UserError(f"{where}: set train= to labeled images (mnist5k, a class folder, tfds:NAME)")
        if self.kind == "zeroshot" and not (self.test or self.train):
            raise UserError(f"{where}: set test= to the labeled images to classify")
        if self.kind == "retrieval" and not self.retrieval:
            raise UserError(f'{where}: set retrieval= to a jsonl of {{"image": path, "captions": [...]}} lines')
        if self.kind in ("zeroshot", "retrieval") and not self.clip_text:
            raise UserError(
                f"{where}: set clip_text= to the open_clip checkpoint (or CLIPModel / SiglipModel directory) holding "
                "the text tower"
            )
        if self.batch <= 0:
            raise UserError(f"{where}: batch must be positive, got {self.batch}")

    @property
    def test_spec(self) -> str:
        return self.test or self.train


def _lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def zeroshot_prompts(
    test: str, classes: list[str], classnames: str | None = None, templates: str | None = None
) -> tuple[list[str], list[str]]:
    """(class names, templates) for zero-shot: digit words for mnist5k, folder names ("_" as spaces)
    otherwise, unless files give them."""
    names = list(DIGITS) if test == "mnist5k" else [c.replace("_", " ") for c in classes]
    prompts = list(MNIST_TEMPLATES if test == "mnist5k" else FOLDER_TEMPLATES)
    if classnames:
        names = _lines(classnames)
        if len(names) != len(classes):
            raise UserError(f"{classnames} has {len(names)} class names but --test has {len(classes)} classes")
    if templates:
        prompts = _lines(templates)
        if not prompts or not all("{}" in t for t in prompts):
            raise UserError(f"{templates}: give one or more templates, each with {{}} for the class name")
    return names, prompts


@dataclasses.dataclass(eq=False)
class ImageSet:
    """Images an evaluator embeds with the weights it runs on: eval batches of a source, and for labeled sets
    int labels and class names. `split` names the set in messages (train, test, retrieval)."""

    split: str
    source: Any
    batches: Iterable[dict[str, np.ndarray]]
    labels: np.ndarray | None = None
    classes: list[str] | None = None


@dataclasses.dataclass(eq=False)
class Embedded:
    """Fixed features of an image set (what a frozen image tower gave once): row i is record index[i]."""

    split: str
    feats: np.ndarray
    index: np.ndarray
    labels: np.ndarray | None = None
    classes: list[str] | None = None


Images = ImageSet | Embedded
Need = tuple[Images, str]  # an image set and the forward output wanted of it


@dataclasses.dataclass
class TextTower:
    """A CLIP text tower: config, the frozen params (None when run always gets text params), tokenizer, and how
    its embeddings are computed (batch, mesh)."""

    cfg: TextConfig
    params: Any
    tokenizer: Callable[..., Any]
    batch: int = 256
    mesh: Mesh | None = None
    progress: bool = False

    def _params(self, params: Any) -> Any:
        if params is None and self.params is None:
            raise UserError("this evaluator has no frozen text tower: pass text_params to run")
        return self.params if params is None else params

    def encode(self, tokens: np.ndarray, params: Any = None) -> np.ndarray:
        params = self._params(params)
        return encode_texts(self.cfg, params, tokens, batch=self.batch, mesh=self.mesh, progress=self.progress)

    def classifier(self, names: list[str], templates: list[str], params: Any = None) -> np.ndarray:
        params, kw = self._params(params), dict(batch=self.batch, mesh=self.mesh, progress=self.progress)
        return zeroshot_classifier(self.cfg, params, names, templates, self.tokenizer, **kw)


class Features:
    """Features of image sets under one set of vision weights: each set embedded once, in one pass for every
    output key wanted of it (`needs`), its unreadable records reported to `ctx.on_skipped`."""

    def __init__(self, ctx: Context, params: Any, needs: Iterable[Need]) -> None:
        self.ctx, self.params = ctx, params
        self.keys: dict[int, tuple[str, ...]] = {}
        for images, key in needs:
            self.keys[id(images)] = tuple(dict.fromkeys((*self.keys.get(id(images), ()), key)))
        self._done: dict[int, tuple[dict[str, np.ndarray], np.ndarray]] = {}

    def __call__(self, images: Images, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(features, record index of each row) of `images` at output `key`."""
        if isinstance(images, Embedded):
            return images.feats, images.index
        if id(images) not in self._done:
            if self.params is None:
                raise UserError(f"the {images.split} images are embedded on run: pass the vision params")
            keys = tuple(dict.fromkeys((*self.keys.get(id(images), ()), key)))
            self._done[id(images)] = self._extract(images, keys)
        feats, index = self._done[id(images)]
        return feats[key], index

    def _extract(self, images: ImageSet, keys: tuple[str, ...]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        ctx, n = self.ctx, len(images.source)
        desc = f"{images.split} features ({n} images, {ctx.img_size} px)"
        feats, index = extract_features(
            ctx.cfg,
            self.params,
            images.batches,
            keys,
            return_index=True,
            progress=ctx.progress,
            desc=desc,
            mesh=ctx.mesh,
        )
        if ctx.on_skipped is not None:
            ctx.on_skipped(
                images.split, [record_name(images.source, int(i)) for i in np.setdiff1d(np.arange(n), index)]
            )
        return feats, index


@dataclasses.dataclass
class Context:
    """What evaluators are made with: the model evaluated (config, preprocessing meta, image size), the mesh its
    features are computed on, progress bars, `cache_bytes` (image sets decoded once and kept when at most this
    big; 0: read on each run) and `on_skipped(split, names)` for unreadable images. Image sets and text towers
    are opened once per context, shared by its evaluators."""

    cfg: ModelConfig
    meta: dict[str, Any]
    img_size: int
    mesh: Mesh | None = None
    progress: bool = False
    cache_bytes: int = 0
    on_skipped: Callable[[str, list[str]], None] | None = None
    sets: dict[tuple[str, str, int], ImageSet] = dataclasses.field(default_factory=dict)  # labeled, by spec
    opened: list[ImageSet] = dataclasses.field(default_factory=list)  # every image set made, in order
    towers: dict[tuple[str, str, str], TextTower] = dataclasses.field(default_factory=dict)
    checked: set[tuple[str, str]] = dataclasses.field(default_factory=set)  # (train, test) pairs checked for overlap

    @property
    def view(self) -> dict[str, Any]:
        return Preprocess.from_meta(self.meta, self.cfg.name).eval_view(self.img_size)

    def image_set(self, source: Any, split: str, batch: int, labels: Any = None, classes: Any = None) -> ImageSet:
        batches = EvalBatches(source, batch_size=batch, img_size=self.img_size, **self.view)
        if self.cache_bytes:
            batches = decoded_once(batches, self.cache_bytes)
        self.opened.append(ImageSet(split, source, batches, labels, classes))
        return self.opened[-1]

    def labeled(self, spec: str, split: str, batch: int) -> ImageSet:
        """The labeled image set `spec` (mnist5k, a class folder, tfds:NAME), opened once per (split, batch)."""
        if (spec, split, batch) not in self.sets:
            images = open_images(spec, split=split, labeled=True)
            self.sets[spec, split, batch] = self.image_set(images.source, split, batch, images.labels, images.classes)
        return self.sets[spec, split, batch]

    def warn_shared(self, train_spec: str, test_spec: str, train: ImageSet, test: ImageSet) -> None:
        """Say once per (train, test) pair when test images are train images too: their scores are not held out."""
        if (train_spec, test_spec) in self.checked:
            return
        self.checked.add((train_spec, test_spec))
        shared = shared_files(train.source, test.source)
        if shared:
            print(
                f"eval: warning: {shared} of the {len(test.source)} test images are also train images "
                f"({train_spec} / {test_spec}): kNN and probe scores on them are not held out",
                file=sys.stderr,
            )

    def text_tower(self, spec: EvalSpec) -> TextTower:
        """The frozen text tower of `spec.clip_text`, loaded once per context."""
        key = (spec.clip_text, spec.text_arch, spec.bpe_vocab)
        if key not in self.towers:
            text_cfg, params, tokenizer = open_text_tower(
                spec.clip_text, self.cfg, spec.text_arch or None, spec.bpe_vocab or None
            )
            self.towers[key] = TextTower(text_cfg, params, tokenizer, mesh=self.mesh, progress=self.progress)
        return self.towers[key]

    def features(self, params: Any, needs: Iterable[Need]) -> Features:
        return Features(self, params, needs)


class Evaluator:
    """Base: `needs()` lists (image set, output key) pairs; `run` scores vision `params` (and/or `text_params`)."""

    ctx: Context
    details: dict[str, Any]

    def needs(self) -> list[Need]:
        raise NotImplementedError

    def run(self, params: Any = None, *, text_params: Any = None, features: Features | None = None) -> dict:
        raise NotImplementedError

    def _features(self, params: Any, features: Features | None) -> Features:
        return features if features is not None else self.ctx.features(params, self.needs())

    def freeze(self, params: Any) -> None:
        """Embed this evaluator's image sets now with `params`, a frozen image tower: later runs need only the
        text params (the text stage, where the text tower is what is trained)."""
        features = self.ctx.features(params, self.needs())
        for name, images in list(vars(self).items()):
            if isinstance(images, ImageSet):
                feats, index = features(images, next(k for s, k in self.needs() if s is images))
                setattr(self, name, Embedded(images.split, feats, index, images.labels, images.classes))


def _labels(features: Features, images: Images, key: str) -> tuple[np.ndarray, np.ndarray]:
    feats, index = features(images, key)
    return feats, images.labels[index]


def shared_files(train: Any, test: Any) -> int:
    """How many test records are train records too (the same file), for sources that name their files."""
    if not (hasattr(train, "path") and hasattr(test, "path")):
        return 0
    resolve = lambda path: str(path) if is_uri(str(path)) else os.path.realpath(path)  # noqa: E731
    train_files = {resolve(train.path(i)) for i in range(len(train))}
    return sum(resolve(test.path(i)) in train_files for i in range(len(test)))


class _TrainTest(Evaluator):
    """kNN and the linear probe: pooled features of a labeled train set and a test set with the same classes."""

    def __init__(self, spec: EvalSpec, ctx: Context) -> None:
        self.spec, self.ctx, self.details = spec, ctx, {}
        self.train = ctx.labeled(spec.train, "train", spec.batch)
        self.test = ctx.labeled(spec.test_spec, "test", spec.batch)
        if self.train.classes != self.test.classes:
            raise UserError(f"train classes {self.train.classes[:10]} and test classes {self.test.classes[:10]} differ")
        ctx.warn_shared(spec.train, spec.test_spec, self.train, self.test)

    def needs(self) -> list[Need]:
        return [(self.test, "pooled"), (self.train, "pooled")]

    def _data(self, params: Any, features: Features | None) -> tuple[np.ndarray, ...]:
        features = self._features(params, features)
        test_x, test_y = _labels(features, self.test, "pooled")
        train_x, train_y = _labels(features, self.train, "pooled")
        classes = len(self.train.classes)
        self.details = {"classes": classes, "test_images": len(test_y), "train_images": len(train_y)}
        return train_x, train_y, test_x, test_y


class KnnEval(_TrainTest):
    """DINOv2's weighted kNN top-1 for each k in DINOV2_KS up to the train size: {"knn@K": accuracy}."""

    def run(self, params: Any = None, *, text_params: Any = None, features: Features | None = None) -> dict:
        train_x, train_y, test_x, test_y = self._data(params, features)
        ks = tuple(k for k in DINOV2_KS if k <= len(train_y))
        acc = knn_accuracy(train_x, train_y, test_x, test_y, ks=ks, num_classes=len(self.train.classes))
        return {f"knn@{k}": float(v) for k, v in acc.items()}


class LinearProbeEval(_TrainTest):
    """Linear-probe top-1 on the test set ({"top1"}); details["train_top1"] is the fit's train accuracy."""

    def run(self, params: Any = None, *, text_params: Any = None, features: Features | None = None) -> dict:
        train_x, train_y, test_x, test_y = self._data(params, features)
        probe = linear_probe(train_x, train_y, test_x, test_y, l2=self.spec.l2, num_classes=len(self.train.classes))
        self.details["train_top1"] = probe["train_top1"]
        return {"top1": probe["top1"]}


class ZeroShotEval(Evaluator):
    """Zero-shot top-k (k in ZEROSHOT_KS up to the class count) of a labeled test set by class prompts:
    {"topK": accuracy}. `images` / `text` replace the set and tower the spec names (the text stage's)."""

    def __init__(self, spec: EvalSpec, ctx: Context, *, images: Images | None = None, text: TextTower | None = None):
        self.ctx, self.details = ctx, {}
        self.test = images or ctx.labeled(spec.test_spec, "test", spec.batch)
        self.names, self.templates = zeroshot_prompts(
            spec.test_spec, self.test.classes, spec.classnames or None, spec.templates or None
        )
        self.text = text or ctx.text_tower(spec)
        self.classifier = self.text.classifier(self.names, self.templates) if self.text.params is not None else None
        self.key = clip_embedding(ctx.cfg)[0]

    def needs(self) -> list[Need]:
        return [(self.test, self.key)]

    def run(self, params: Any = None, *, text_params: Any = None, features: Features | None = None) -> dict:
        classifier = self.classifier
        if text_params is not None or classifier is None:
            classifier = self.text.classifier(self.names, self.templates, text_params)
        emb, labels = _labels(self._features(params, features), self.test, self.key)
        ks = tuple(k for k in ZEROSHOT_KS if k <= len(self.test.classes))
        top = zeroshot_accuracy(emb, labels, classifier, ks)
        self.details = {"classes": len(self.test.classes), "test_images": len(labels), "templates": len(self.templates)}
        return {f"top{k}": v for k, v in top.items()}


class RetrievalEval(Evaluator):
    """Image-text retrieval recall@k both ways (k in RETRIEVAL_KS up to the image and caption counts) on the
    pairs of a jsonl manifest: {"image_to_text_R@K", "text_to_image_R@K"}. An image that does not read is left
    out with its captions. `pairs` / `images` / `text` / `tokens` replace what the spec names (the text stage's)."""

    def __init__(
        self,
        spec: EvalSpec,
        ctx: Context,
        *,
        pairs: Pairs | None = None,
        images: Images | None = None,
        text: TextTower | None = None,
        tokens: np.ndarray | None = None,
    ) -> None:
        self.ctx, self.details = ctx, {}
        if pairs is None:
            pairs = read_manifest(spec.retrieval)
            require_good(pairs, "--retrieval", by_line=True)
            warn_bad_pairs(pairs, "retrieval pairs", prog="eval", by_line=True)
        self.pairs = pairs
        self.images = images or ctx.image_set(pairs.source, "retrieval", spec.batch)
        self.text = text or ctx.text_tower(spec)
        captions, self.owners = pairs.flat_captions()
        if tokens is None:
            tokens = self.text.tokenizer(captions, context_length=self.text.cfg.context_length)
        self.tokens = np.asarray(tokens)
        self.key = clip_embedding(ctx.cfg)[0]
        self._frozen: tuple[np.ndarray, np.ndarray] | None = None  # (kept images, caption embeddings)
        if isinstance(self.images, ImageSet) and isinstance(self.images.batches, list) and self.text.params is not None:
            self._captions(np.concatenate([b["index"] for b in self.images.batches]), None)  # embedded up front

    def needs(self) -> list[Need]:
        return [(self.images, self.key)]

    def _captions(self, kept: np.ndarray, text_params: Any) -> np.ndarray:
        """Embeddings of the captions of the `kept` images (the frozen tower's computed once)."""
        has_image = np.isin(self.owners, kept)
        if text_params is not None or self.text.params is None:
            return self.text.encode(self.tokens[has_image], text_params)
        if self._frozen is None or not np.array_equal(self._frozen[0], kept):
            self._frozen = (kept, self.text.encode(self.tokens[has_image]))
        return self._frozen[1]

    def run(self, params: Any = None, *, text_params: Any = None, features: Features | None = None) -> dict:
        emb, kept = self._features(params, features)(self.images, self.key)
        has_image = np.isin(self.owners, kept)  # a caption of an unreadable image drops out with it
        owners = np.searchsorted(kept, self.owners[has_image])
        text_emb = self._captions(kept, text_params)
        ks = tuple(k for k in RETRIEVAL_KS if k <= min(len(kept), int(has_image.sum())))
        recall = retrieval_recall(emb, text_emb, owners, ks)
        self.details = {"images": len(kept), "captions": int(has_image.sum())}
        return {f"{way}_R@{k}": v for way, by_k in recall.items() for k, v in by_k.items()}


EVALUATORS: dict[str, type[Evaluator]] = {
    "knn": KnnEval,
    "linear_probe": LinearProbeEval,
    "zeroshot": ZeroShotEval,
    "retrieval": RetrievalEval,
}


def make_evaluator(spec: EvalSpec, ctx: Context) -> Evaluator:
    """The evaluator of `spec`, its inputs opened and checked."""
    return EVALUATORS[spec.kind](spec, ctx)


def run_all(evaluators: Sequence[Evaluator], ctx: Context, params: Any) -> list[dict]:
    """The metrics of each evaluator on vision `params`, every image set embedded once for all of them."""
    features = ctx.features(params, [need for ev in evaluators for need in ev.needs()])
    return [ev.run(params, features=features) for ev in evaluators]
