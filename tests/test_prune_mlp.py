"""MLP pruning is exact surgery; cost accounting reproduces the paper's numbers; bad targets fail early."""

from __future__ import annotations

import numpy as np
import pytest

import dgmr_jax as dj
from dgmr_jax.models.tree import flatten, stack_blocks, unflatten
from dgmr_jax.prune.mlp import LayerReport, prune_layer, prune_mlp, target_widths

# one preset per MLP kind: GELU, split SwiGLU, packed SwiGLU (DINOv2-g), split SwiGLU + hidden LayerNorm
KINDS = {
    "gelu": dict(name="vit_tiny_patch16_224", img_size=32),
    "swiglu": dict(name="eva02_base_patch14_224", img_size=28, width=64, num_heads=4, hidden=192, mlp_norm=False),
    "packed_swiglu": dict(name="vit_giant_patch14_dinov2", img_size=28, width=48, num_heads=4, hidden=128),
}


def _model(kind: str, depth: int = 2, **extra):
    fields = dict(KINDS[kind], depth=depth, **extra)
    cfg = dj.models.preset(fields.pop("name"), **fields)
    params = dj.models.init_params(cfg, 0)
    rng = np.random.default_rng(0)  # layer scales and biases away from their 1 / 0 init
    params = {k: v for k, v in flatten(params).items()}
    params = {
        k: v + rng.normal(0, 0.1, v.shape).astype(v.dtype) if k.endswith(("bias", "scale")) else v
        for k, v in params.items()
    }
    return cfg, unflatten(params)


def _zero_dropped_rows(params, kept: dict[int, np.ndarray]):
    out = {k: np.array(v) for k, v in flatten(params).items()}
    for i, idx in kept.items():
        mask = np.ones(out[f"blocks_{i}/mlp/fc2/kernel"].shape[0], bool)
        mask[idx] = False
        out[f"blocks_{i}/mlp/fc2/kernel"][mask] = 0.0
    return unflatten(out)


@pytest.mark.parametrize(  # the SwiGLU kinds take seconds each here: slow tier
    "kind", [pytest.param(k, marks=pytest.mark.slow) if "swiglu" in k else k for k in sorted(KINDS)]
)
@pytest.mark.parametrize("method", [pytest.param("diversity", marks=pytest.mark.slow), "l2", "random"])
def test_pruning_equals_zeroing_the_dropped_fc2_rows(kind, method):
    cfg, params = _model(kind)
    kept = {i: np.sort(prune_layer(cfg, params[f"blocks_{i}"]["mlp"], 40, method, seed=i)[1]) for i in range(2)}
    pruned_cfg, pruned = prune_mlp(cfg, params, method=method, hidden=40)
    assert pruned_cfg.mlp_hidden == (40, 40)
    x = np.random.default_rng(1).normal(size=(2, cfg.img_size, cfg.img_size, 3)).astype(np.float32)
    ref = dj.models.forward(cfg, _zero_dropped_rows(params, kept), x)
    out = dj.models.forward(pruned_cfg, pruned, x)
    for key in ref:
        np.testing.assert_allclose(out[key], ref[key], rtol=1e-5, atol=1e-5 * float(np.abs(ref[key]).max()))
    full = dj.models.forward(cfg, params, x)["tokens"]
    assert not np.allclose(out["tokens"], full, atol=1e-3)  # the surgery removed something real


def test_scanned_stack_prunes_like_the_loop_and_reports_curves():
    cfg, params = _model("gelu", depth=3)
    report: list[LayerReport] = []
    loop_cfg, loop = prune_mlp(cfg, params, mlp_ratio=0.5, report=report)
    scan_cfg, scanned = prune_mlp(cfg.replace(scan_layers=True), stack_blocks(params), mlp_ratio=0.5)
    assert scan_cfg.scan_layers and scan_cfg.mlp_hidden == loop_cfg.mlp_hidden == (96, 96, 96)
    np.testing.assert_array_equal(
        scanned["blocks"]["block"]["mlp"]["fc1"]["kernel"][2], loop["blocks_2"]["mlp"]["fc1"]["kernel"]
    )
    assert [r.hidden_after for r in report] == [96, 96, 96]
    assert all(r.residual_norms.shape == (96,) and np.all(np.diff(r.residual_norms) <= 1e-6) for r in report)


def test_per_layer_widths_and_rounding():
    cfg, params = _model("gelu", depth=3)
    new_cfg, new = prune_mlp(cfg, params, method="l2", hidden=[10, 100, 700], round_to=64)
    assert new_cfg.mlp_hidden == (64, 128, 704)
    assert new["blocks_2"]["mlp"]["fc2"]["kernel"].shape == (704, 192)
    sd = dj.convert.to_torch(new_cfg, new)
    assert sd["blocks.0.mlp.fc1.weight"].shape == (64, 192)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(mlp_ratio=0), "--mlp-ratio must be a finite number > 0, got 0"),
        (dict(mlp_ratio=-1.0), "--mlp-ratio must be a finite number > 0, got -1.0"),
        (dict(mlp_ratio=float("inf")), "--mlp-ratio must be a finite number > 0, got inf"),
        (dict(mlp_ratio=float("nan")), "--mlp-ratio must be a finite number > 0, got nan"),
        (dict(mlp_ratio=4.0), r"nothing to prune: --mlp-ratio 4.0 keeps every neuron \(MLP widths \[768\]"),
        (dict(hidden=700, round_to=128), r"nothing to prune: --hidden 700 keeps every neuron"),
        (dict(hidden=8, round_to=0), "--round-to must be >= 1, got 0"),
        (dict(hidden=0), "layer 0: target width 0 must be > 0"),
        (dict(hidden=769), "layer 0: target width 769 exceeds the current width 768"),
        (dict(hidden=[10, 10]), "--hidden lists 2 widths but the model has 3 layers"),
        (dict(), "give exactly one of --mlp-ratio or --hidden"),
        (dict(mlp_ratio=1, hidden=5), "give exactly one of --mlp-ratio or --hidden"),
    ],
)
def test_impossible_targets_fail_before_work(kwargs, message):
    cfg = dj.models.preset("vit_tiny_patch16_224", depth=3)
    with pytest.raises(ValueError, match=message):
        target_widths(cfg, **kwargs)


def test_unknown_method_and_taylor_without_scores():
    cfg, params = _model("gelu")
    with pytest.raises(ValueError, match="unknown method 'magic'; choose one of diversity, l2, random, taylor"):
        prune_mlp(cfg, params, method="magic", mlp_ratio=1)
    with pytest.raises(ValueError, match="method='taylor' needs scores="):
        prune_mlp(cfg, params, method="taylor", mlp_ratio=1)


@pytest.mark.parametrize(
    "name,hidden,params_b,param_drop,flop_drop",
    [
        ("eva02_enormous_patch14_clip_224", 1792, 1.24, 71.6, 70.6),
        ("ViT-g-14", 1408, 0.48, 52.7, None),
        ("vit_giant_patch14_dinov2", 1536, None, 41.6, None),
    ],
)
def test_cost_of_prune1_matches_the_paper(name, hidden, params_b, param_drop, flop_drop):
    cfg = dj.models.preset(name, img_size=224)  # the paper counts at 224 px (DINOv2 presets default to 518)
    slim = cfg.replace(mlp_hidden=(hidden,) * cfg.depth)
    before, after = dj.prune.count_params(cfg), dj.prune.count_params(slim)
    if params_b:
        assert round(after / 1e9, 2) == params_b
    assert round(100 * (1 - after / before), 1) == param_drop
    if flop_drop:
        flops = dj.prune.count_flops(slim) / dj.prune.count_flops(cfg)
        assert round(100 * (1 - flops), 1) == flop_drop


def test_flops_per_layer_add_up():
    cfg = dj.models.preset("vit_small_patch16_224")
    per = dj.prune.count_flops(cfg, per_layer=True)
    assert per["total"] == sum(per["layers"]) + per["embed"] + per["head"] == dj.prune.count_flops(cfg)
    n, d = 197, 384
    assert per["layers"][0] == 2 * (n * d * 3 * d + 2 * n * n * d + n * d * d + 2 * n * d * 4 * d)
