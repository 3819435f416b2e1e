"""Evaluation inside the train loop (`config.evals`, big_vision style): kNN, linear probe, CLIP zero-shot and
retrieval of the student every `config.eval_every` steps and at the end.

Each entry of `config.evals` is a dict (or the short form "KIND:DATA", e.g. "knn:mnist5k"):
  kind        knn | linear_probe | zeroshot | retrieval
  train       labeled images for the kNN memory bank / probe fit (split "train"): mnist5k, a class folder, tfds:NAME
  test        labeled images scored (split "test"; default: the train spec)
  retrieval   for kind retrieval: a jsonl of {"image": path, "captions": [...]}
  clip_text   for zeroshot / retrieval: the open_clip checkpoint of the (frozen) text tower
  text_arch   its text preset or TextConfig .json (default: the model's arch name)
  classnames, templates   for zeroshot: files as for `dgmr-jax eval --classnames/--templates`
  name        the metrics' prefix, "eval/<name>/..." (default: the kind)
  batch, l2   eval batch and probe regularization (as `dgmr-jax eval`)
Every input is opened, the text tower loaded and prompts/captions embedded when the run starts, so a bad eval
setting fails before the first step. The student is evaluated exactly as `dgmr-jax eval` evaluates the model
directory the run would export at that step: same config, weights, preprocessing and kNN / probe code, on the
run's mesh. The train step is not touched (the evaluation is its own jitted forward): no recompile.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
from jax.sharding import Mesh

from dgmr_jax.data import open_images
from dgmr_jax.eval.features import EvalBatches, extract_features
from dgmr_jax.eval.knn import DINOV2_KS, knn_accuracy
from dgmr_jax.eval.linear_probe import linear_probe
from dgmr_jax.eval.run import RETRIEVAL_KS, ZEROSHOT_KS, ClipEval, RetrievalFiles, read_retrieval, zeroshot_prompts
from dgmr_jax.eval.zeroshot import encode_texts, retrieval_recall, zeroshot_accuracy, zeroshot_classifier
from dgmr_jax.io.clip import clip_embedding, open_text_tower
from dgmr_jax.models.config import ModelConfig
from dgmr_jax.models.preprocess import Preprocess

KINDS = ("knn", "linear_probe", "zeroshot", "retrieval")
PRIMARY = {"knn": "knn@20", "linear_probe": "top1", "zeroshot": "top1", "retrieval": "image_to_text_R@1"}
CACHE_BYTES = 1 << 30  # eval images decoded once and kept in memory when they take at most this much


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """One entry of config.evals (see the module docstring)."""

    kind: str
    train: str = ""
    test: str = ""
    retrieval: str = ""
    clip_text: str = ""
    text_arch: str = ""
    classnames: str = ""
    templates: str = ""
    name: str = ""
    batch: int = 64
    l2: float = 1e-3

    def __post_init__(self) -> None:
        where = f"config.evals entry {self.name or self.kind!r}"
        if self.kind not in KINDS:
            raise ValueError(f"{where}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind in ("knn", "linear_probe") and not self.train:
            raise ValueError(f"{where}: set train= to labeled images (mnist5k, a class folder, tfds:NAME)")
        if self.kind == "zeroshot" and not (self.test or self.train):
            raise ValueError(f"{where}: set test= to the labeled images to classify")
        if self.kind == "retrieval" and not self.retrieval:
            raise ValueError(f'{where}: set retrieval= to a jsonl of {{"image": path, "captions": [...]}} lines')
        if self.kind in ("zeroshot", "retrieval") and not self.clip_text:
            raise ValueError(f"{where}: set clip_text= to the open_clip checkpoint holding the text tower")
        if self.batch <= 0:
            raise ValueError(f"{where}: batch must be positive, got {self.batch}")

    @property
    def test_spec(self) -> str:
        return self.test or self.train


def parse_evals(entries: Any) -> list[EvalSpec]:
    """config.evals as EvalSpecs with unique names; "KIND:DATA" strings are short for {kind, train: DATA}."""
    specs, names = [], set()
    for entry in entries or ():
        if isinstance(entry, str):
            kind, sep, data = entry.partition(":")
            if not sep:
                raise ValueError(f'config.evals entry {entry!r}: write "KIND:DATA" (e.g. "knn:mnist5k") or a dict')
            entry = {"kind": kind, "retrieval" if kind == "retrieval" else "train": data}
        if not isinstance(entry, Mapping):
            raise ValueError(f"config.evals entries are dicts or 'KIND:DATA' strings, got {entry!r}")
        fields = {f.name for f in dataclasses.fields(EvalSpec)}
        unknown = sorted(set(entry) - fields)
        if unknown:
            raise ValueError(f"config.evals entry {dict(entry)}: unknown keys {unknown}; known: {sorted(fields)}")
        spec = EvalSpec(**dict(entry))
        name = spec.name or spec.kind
        if name in names:
            name = f"{name}_{len(specs)}"
        names.add(name)
        specs.append(dataclasses.replace(spec, name=name))
    return specs


def primary_metric(spec: EvalSpec) -> str:
    """The metric of an eval that best.json follows by default."""
    return f"eval/{spec.name}/{PRIMARY[spec.kind]}"


class _Images:
    """A labeled image set's eval batches, decoded once when small enough, else read each time."""

    def __init__(self, spec: str, split: str, size: int, view: dict[str, Any], batch: int) -> None:
        images = open_images(spec, split=split, labeled=True)
        self.labels, self.classes, self.spec = images.labels, images.classes, spec
        self.batches = EvalBatches(images.source, batch_size=batch, img_size=size, **view)
        if len(images.source) * size * size * 12 <= CACHE_BYTES:
            self.batches = list(self.batches)


class InLoopEval:
    """The evals of a run, opened and checked up front; calling it scores one set of student weights."""

    def __init__(
        self, specs: list[EvalSpec], cfg: ModelConfig, meta: dict[str, Any], mesh: Mesh, img_size: int
    ) -> None:
        self.specs, self.cfg, self.mesh = specs, cfg, mesh
        view = Preprocess.from_meta(meta, cfg.name).eval_view(img_size)
        self._sets: dict[tuple[str, str, int], _Images] = {}
        self._clip: dict[str, Any] = {}
        for spec in specs:
            if spec.kind in ("knn", "linear_probe"):
                train = self._images(spec.train, "train", img_size, view, spec.batch)
                test = self._images(spec.test_spec, "test", img_size, view, spec.batch)
                if train.classes != test.classes:
                    raise ValueError(
                        f"eval {spec.name!r}: train classes {train.classes[:10]} and test {test.classes[:10]}"
                    )
            if spec.kind == "zeroshot":
                test = self._images(spec.test_spec, "test", img_size, view, spec.batch)
                clip = ClipEval(
                    spec.clip_text,
                    spec.text_arch or None,
                    zeroshot=True,
                    classnames=spec.classnames or None,
                    templates=spec.templates or None,
                )
                text_cfg, text_params, tokenizer = open_text_tower(spec.clip_text, cfg, spec.text_arch or None)
                names, templates = zeroshot_prompts(clip, spec.test_spec, test.classes)
                self._clip[spec.name] = zeroshot_classifier(text_cfg, text_params, names, templates, tokenizer)
            if spec.kind == "retrieval":
                text_cfg, text_params, tokenizer = open_text_tower(spec.clip_text, cfg, spec.text_arch or None)
                files, captions, owners = read_retrieval(spec.retrieval)
                text_emb = encode_texts(text_cfg, text_params, tokenizer(captions), mesh=mesh)
                batches = EvalBatches(
                    RetrievalFiles(files, spec.retrieval), batch_size=spec.batch, img_size=img_size, **view
                )
                self._clip[spec.name] = (list(batches), text_emb, owners)

    def _images(self, spec: str, split: str, size: int, view: dict[str, Any], batch: int) -> _Images:
        key = (spec, split, batch)
        if key not in self._sets:
            self._sets[key] = _Images(spec, split, size, view, batch)
        return self._sets[key]

    def __call__(self, params: Any) -> dict[str, float]:
        """{"eval/<name>/<metric>": value} for every eval, on `params` (the student's weights as exported)."""
        cfg, out = self.cfg, {}
        feats: dict[tuple[int, str], np.ndarray] = {}

        def features(images: _Images | list, key: str) -> tuple[np.ndarray, np.ndarray]:
            """Features (and record index) of a set, computed once per call and output key."""
            batches = images.batches if isinstance(images, _Images) else images
            if (id(batches), key) not in feats:
                feats[id(batches), key] = extract_features(
                    cfg, params, batches, key, return_index=True, progress=False, mesh=self.mesh
                )
            return feats[id(batches), key]

        for spec in self.specs:
            prefix = f"eval/{spec.name}/"
            if spec.kind in ("knn", "linear_probe"):
                train, test = (
                    self._sets[spec.train, "train", spec.batch],
                    self._sets[spec.test_spec, "test", spec.batch],
                )
                train_x, train_i = features(train, "pooled")
                test_x, test_i = features(test, "pooled")
                train_y, test_y = train.labels[train_i], test.labels[test_i]
                if spec.kind == "knn":
                    ks = tuple(k for k in DINOV2_KS if k <= len(train_y))
                    acc = knn_accuracy(train_x, train_y, test_x, test_y, ks=ks, num_classes=len(train.classes))
                    out.update({f"{prefix}knn@{k}": float(v) for k, v in acc.items()})
                else:
                    probe = linear_probe(train_x, train_y, test_x, test_y, l2=spec.l2, num_classes=len(train.classes))
                    out[f"{prefix}top1"] = probe["top1"]
            elif spec.kind == "zeroshot":
                test = self._sets[spec.test_spec, "test", spec.batch]
                emb, index = features(test, clip_embedding(cfg)[0])
                ks = tuple(k for k in ZEROSHOT_KS if k <= len(test.classes))
                top = zeroshot_accuracy(emb, test.labels[index], self._clip[spec.name], ks)
                out.update({f"{prefix}top{k}": v for k, v in top.items()})
            else:
                batches, text_emb, owners = self._clip[spec.name]
                emb, kept = features(batches, clip_embedding(cfg)[0])
                has_image = np.isin(owners, kept)  # captions of unreadable images drop out with them
                owners_kept = np.searchsorted(kept, owners[has_image])
                ks = tuple(k for k in RETRIEVAL_KS if k <= min(len(kept), int(has_image.sum())))
                recall = retrieval_recall(emb, text_emb[has_image], owners_kept, ks)
                for direction, by_k in recall.items():
                    out.update({f"{prefix}{direction}_R@{k}": v for k, v in by_k.items()})
        return out
