"""`dgmr-jax eval`: kNN (DINOv2 protocol) and linear-probe accuracy of a model directory on labeled images."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from dgmr_jax.data import ImageFolderSource, Mnist5kSource, family_mean_std
from dgmr_jax.eval.features import EvalBatches, extract_features
from dgmr_jax.eval.knn import DINOV2_KS, knn_accuracy
from dgmr_jax.eval.linear_probe import linear_probe
from dgmr_jax.model_dir import load_config, load_params


def labeled_source(spec: str, split: str) -> tuple[Any, np.ndarray, list[str]]:
    """(source, int labels, class names) for "mnist5k" (its fixed train/test split) or a folder whose
    first-level subfolders are the classes (give the train and test folders separately)."""
    if spec == "mnist5k":
        source = Mnist5kSource(split)
        return source, np.asarray(source.labels), [str(c) for c in range(source.num_classes)]
    if not os.path.isdir(spec):
        raise FileNotFoundError(f"{spec} is neither 'mnist5k' nor a folder of class subfolders")
    source = ImageFolderSource(spec)
    names = [rel.split(os.sep)[0] if os.sep in rel else "" for rel in source.relpaths]
    if "" in names:
        raise ValueError(f"{spec}: images must sit in class subfolders (found one at the top level)")
    classes = sorted(set(names))
    return source, np.array([classes.index(n) for n in names]), classes


def evaluate(
    model_dir: str, train: str, test: str, img_size: int | None = None, batch: int = 64, l2: float = 1e-3
) -> dict[str, Any]:
    """Pooled features of train and test images -> kNN top-1 per k and linear-probe top-1."""
    cfg, meta = load_config(model_dir)
    train_source, train_labels, classes = labeled_source(train, "train")
    test_source, test_labels, test_classes = labeled_source(test, "test")
    if test_classes != classes:
        raise ValueError(f"train classes {classes[:10]} and test classes {test_classes[:10]} differ")
    params = load_params(model_dir)
    mean, std = family_mean_std(meta.get("family", "timm"))
    size = img_size or cfg.img_size
    feats = [
        extract_features(cfg, params, EvalBatches(src, batch_size=batch, img_size=size, mean=mean, std=std))
        for src in (train_source, test_source)
    ]
    ks = tuple(k for k in DINOV2_KS if k <= len(train_labels))
    knn = knn_accuracy(feats[0], train_labels, feats[1], test_labels, ks=ks, num_classes=len(classes))
    probe = linear_probe(feats[0], train_labels, feats[1], test_labels, l2=l2, num_classes=len(classes))
    return {
        "knn": {int(k): float(v) for k, v in knn.items()},
        "linear_probe": probe,
        "classes": len(classes),
        "train_images": len(train_labels),
        "test_images": len(test_labels),
        "img_size": size,
    }
