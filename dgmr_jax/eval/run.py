"""`dgmr-jax eval`: kNN (DINOv2 protocol) and linear-probe accuracy of a model directory on labeled images, and,
with a CLIP text tower, zero-shot accuracy and image-text retrieval recall."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

import jax
import numpy as np

from dgmr_jax.data import open_images, record_name
from dgmr_jax.eval.features import EvalBatches, extract_features
from dgmr_jax.eval.knn import DINOV2_KS, knn_accuracy
from dgmr_jax.eval.linear_probe import linear_probe
from dgmr_jax.eval.zeroshot import encode_texts, retrieval_recall, zeroshot_accuracy, zeroshot_classifier
from dgmr_jax.io.clip import clip_embedding, open_text_tower
from dgmr_jax.io.open import open_model
from dgmr_jax.models.preprocess import Preprocess

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MNIST_TEMPLATES = ("a photo of the number {}.", "a photo of the digit {}.")
FOLDER_TEMPLATES = ("a photo of a {}.",)
ZEROSHOT_KS, RETRIEVAL_KS = (1, 5), (1, 5, 10)


def labeled_source(spec: str, split: str) -> tuple[Any, np.ndarray, list[str]]:
    """(source, int labels, class names) of a labeled image set (see data.open_images); mnist5k gives its
    fixed train/test split, a folder its first-level subfolders as classes."""
    images = open_images(spec, split=split, labeled=True)
    return images.source, images.labels, images.classes


@dataclasses.dataclass(frozen=True)
class ClipEval:
    """What zero-shot / retrieval evaluation needs: the open_clip checkpoint whose text tower (the original:
    DGMR prunes only the vision tower) embeds prompts and captions, and which measurements to run."""

    checkpoint: str
    text_arch: str | None = None  # text preset or TextConfig .json; default: the vision model's arch name
    zeroshot: bool = False  # classify the test images by prompts built from their class names
    retrieval: str | None = None  # jsonl of {"image": path, "captions": [...]}, paths relative to the file
    classnames: str | None = None  # file: one class name per line, in sorted class-folder order
    templates: str | None = None  # file: one prompt per line, "{}" standing for the class name
    bpe_vocab: str | None = None  # bpe_simple_vocab_16e6.txt.gz (default: the one in open_clip_torch)

    def __post_init__(self) -> None:
        if not (self.zeroshot or self.retrieval):
            raise ValueError("a CLIP text tower is only used with --zeroshot and/or --retrieval FILE")


def read_retrieval(path: str) -> tuple[list[str], list[str], np.ndarray]:
    """(image paths, captions, image index of each caption) from a jsonl file of {"image": path, "captions":
    [...]} lines; relative image paths are taken from the file's folder."""
    root = os.path.dirname(os.path.abspath(path))
    images, captions, owners = [], [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} line {n} is not JSON ({err})") from err
            ok = isinstance(record, dict) and isinstance(record.get("image"), str)
            caps = record.get("captions") if ok else None
            if not (isinstance(caps, list) and caps and all(isinstance(c, str) for c in caps)):
                raise ValueError(f'{path} line {n}: expected {{"image": path, "captions": [one or more strings]}}')
            image = os.path.join(root, record["image"])
            if not os.path.isfile(image):
                raise FileNotFoundError(f"{path} line {n}: image {image} does not exist")
            captions += caps
            owners += [len(images)] * len(caps)
            images.append(image)
    if not images:
        raise ValueError(f"{path} lists no images")
    return images, captions, np.asarray(owners)


class RetrievalFiles:
    """Image files by path, as the encoded-bytes source that EvalBatches reads."""

    def __init__(self, paths: list[str], listed_in: str) -> None:
        self.paths, self.listed_in = paths, listed_in

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> bytes:
        with open(self.paths[i], "rb") as f:
            return f.read()

    def path(self, i: int) -> str:
        """Path of image i (named in the messages about unreadable images)."""
        return self.paths[i]

    def __repr__(self) -> str:
        return f"RetrievalImages(listed_in={self.listed_in!r}, num_images={len(self)})"


def _lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def zeroshot_prompts(clip: ClipEval, test: str, classes: list[str]) -> tuple[list[str], list[str]]:
    """(class names, templates) for zero-shot: digit words for mnist5k, folder names ("_" as spaces)
    otherwise, unless files give them."""
    names = list(DIGITS) if test == "mnist5k" else [c.replace("_", " ") for c in classes]
    templates = list(MNIST_TEMPLATES if test == "mnist5k" else FOLDER_TEMPLATES)
    if clip.classnames:
        names = _lines(clip.classnames)
        if len(names) != len(classes):
            raise ValueError(f"{clip.classnames} has {len(names)} class names but --test has {len(classes)} classes")
    if clip.templates:
        templates = _lines(clip.templates)
        if not templates or not all("{}" in t for t in templates):
            raise ValueError(f"{clip.templates}: give one or more templates, each with {{}} for the class name")
    return names, templates


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
    left out (with their labels, or captions), named in a warning and in result["skipped_files"][split]."""
    model = open_model(model_dir)
    cfg = model.cfg
    knn = train != "none"
    if not knn and clip is None:
        raise ValueError("--train none leaves nothing to evaluate: add --zeroshot or --retrieval (with --clip-text)")
    classes = None
    if knn or (clip and clip.zeroshot):
        test_source, test_labels, classes = labeled_source(test, "test")
    if knn:
        train_source, train_labels, train_classes = labeled_source(train, "train")
        if train_classes != classes:
            raise ValueError(f"train classes {train_classes[:10]} and test classes {classes[:10]} differ")
    if clip:
        prompts = zeroshot_prompts(clip, test, classes) if clip.zeroshot else None
        retrieval = read_retrieval(clip.retrieval) if clip.retrieval else None
        text_cfg, text_params, tokenizer = open_text_tower(clip.checkpoint, cfg, clip.text_arch, clip.bpe_vocab)
    size = img_size or cfg.img_size
    view = Preprocess.from_meta(model.meta, cfg.name).eval_view(size)
    params = model.load()
    key = clip_embedding(cfg)[0] if clip else None
    # every test-image output that kNN and zero-shot read, from one pass over the test set
    test_keys = tuple(dict.fromkeys((["pooled"] if knn else []) + ([key] if clip and clip.zeroshot else [])))
    counts = [(len(train_source), "train")] if knn else []
    counts += [(len(test_source), "test")] if test_keys else []
    counts += [(len(retrieval[0]), "retrieval")] if clip and clip.retrieval else []
    hint = " (use --img-size to go faster on CPU)" if img_size is None and jax.default_backend() == "cpu" else ""
    print(
        f"eval: embedding {' + '.join(f'{n} {split}' for n, split in counts)} images at {size} px{hint}",
        file=sys.stderr,
    )
    result: dict[str, Any] = {"img_size": size, "skipped_files": {}}

    def features(split: str, source: Any, key: str | tuple[str, ...]) -> tuple[Any, np.ndarray]:
        """Features of the readable images of `source` and the record index of each row; the unreadable
        ones are named in result["skipped_files"][split] and in a warning."""
        batches = EvalBatches(source, batch_size=batch, img_size=size, **view)
        desc = f"{split} features ({len(source)} images, {size} px)"
        feats, index = extract_features(cfg, params, batches, key, return_index=True, desc=desc)
        skipped = [record_name(source, int(i)) for i in np.setdiff1d(np.arange(len(source)), index)]
        result["skipped_files"][split] = skipped
        if skipped:
            shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
            print(
                f"eval: warning: skipped {len(skipped)} unreadable {split} image{'s' * (len(skipped) > 1)}, "
                f"left out of the results: {shown}",
                file=sys.stderr,
            )
        return feats, index

    if test_keys:
        test_feats, test_index = features("test", test_source, test_keys)
        test_labels = test_labels[test_index]
    if classes is not None:
        result.update(classes=len(classes), test_images=len(test_labels))
    if knn:
        train_feats, train_index = features("train", train_source, "pooled")
        train_labels = train_labels[train_index]
        ks = tuple(k for k in DINOV2_KS if k <= len(train_labels))
        knn_top1 = knn_accuracy(
            train_feats, train_labels, test_feats["pooled"], test_labels, ks=ks, num_classes=len(classes)
        )
        result["knn"] = {int(k): float(v) for k, v in knn_top1.items()}
        result["linear_probe"] = linear_probe(
            train_feats, train_labels, test_feats["pooled"], test_labels, l2=l2, num_classes=len(classes)
        )
        result["train_images"] = len(train_labels)
    if clip:
        result["text_arch"] = text_cfg.name
    if clip and clip.zeroshot:
        classifier = zeroshot_classifier(text_cfg, text_params, *prompts, tokenizer, progress=True)
        ks = tuple(k for k in ZEROSHOT_KS if k <= len(classes))
        top = zeroshot_accuracy(test_feats[key], test_labels, classifier, ks)
        result["zeroshot"] = {**{f"top{k}": v for k, v in top.items()}, "templates": len(prompts[1])}
    if clip and clip.retrieval:
        images, captions, owners = retrieval
        image_emb, kept = features("retrieval", RetrievalFiles(images, clip.retrieval), key)
        # a skipped image takes its captions with it: each caption has exactly one true image
        has_image = np.isin(owners, kept)
        captions = [c for c, keep in zip(captions, has_image, strict=True) if keep]
        owners = np.searchsorted(kept, owners[has_image])
        text_emb = encode_texts(text_cfg, text_params, tokenizer(captions), progress=True)
        ks = tuple(k for k in RETRIEVAL_KS if k <= min(len(kept), len(captions)))
        recall = retrieval_recall(image_emb, text_emb, owners, ks)
        result["retrieval"] = {**recall, "images": len(kept), "captions": len(captions)}
    return result
