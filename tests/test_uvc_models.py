"""UVC slim models: per-layer heads / value widths / absent branches in the config and forward, the masked model
(masked_params, block gates) equal to the slim model (slice_units), FLOPs equal to the jaxpr's matmuls, model
directories and the unit report."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dgmr_jax as dj
from dgmr_jax.model_dir import load_model, save_model
from dgmr_jax.models import slim
from dgmr_jax.models.config import ModelConfig
from dgmr_jax.models.tree import flatten, stack_blocks, unflatten, unstack_blocks
from dgmr_jax.prune.report import unit_rows, write_unit_report

# small configs of each kind of block the slicing has to handle (depth 5, 4 heads of 16 dims, 96 hidden)
_SMALL = dict(img_size=32, width=64, num_heads=4, hidden=96, depth=5)
KINDS = {
    "gelu": dict(name="vit_tiny_patch16_224", **_SMALL, num_classes=10),
    "swiglu_qv_rope": dict(name="eva02_small_patch14_224", **dict(_SMALL, img_size=28)),
    "post_norm_layer_scale": dict(
        name="eva02_enormous_patch14_clip_224", **dict(_SMALL, img_size=28), layer_scale=True
    ),
    "rmsnorm_qk_norm": dict(name="InternViT-6B-448px-V2_5", **dict(_SMALL, img_size=28)),
    "attn_norm_mlp_norm": dict(name="eva02_base_patch14_224", **dict(_SMALL, img_size=28), attn_norm=True),
    "dist_token_proj": dict(name="deit_small_distilled_patch16_224", **_SMALL, num_classes=10, proj_dim=8),
}


def _model(kind: str, array_dtype=np.float32, **extra):
    fields = dict(KINDS[kind], **extra)
    cfg = dj.models.preset(fields.pop("name"), **fields)
    params = dj.models.init_params(cfg.replace(scan_layers=False), 0)
    rng = np.random.default_rng(0)  # biases, norm and layer scales away from their 0 / 1 init
    flat = {
        k: (np.asarray(v) + (rng.normal(0, 0.1, v.shape) if k.endswith(("bias", "scale")) else 0)).astype(array_dtype)
        for k, v in flatten(params).items()
    }
    params = unflatten(flat)
    return cfg, stack_blocks(params) if cfg.scan_layers else params


def _masks(cfg: ModelConfig, seed: int = 0):
    """Hard masks and gates with every case: layer 0 drops a head (full value widths), layer 1 its attention,
    layer 2 its MLP (uneven value widths), layer 3 the whole block, layer 4 keeps every head at one narrow width."""
    rng = np.random.default_rng(seed)
    depth, heads, d, hidden = max(cfg.depth, 5), cfg.num_heads, cfg.attn_head_dim, cfg.mlp_hidden[0]
    mh = np.ones((depth, heads))
    md = (rng.random((depth, heads, d)) < 0.6).astype(np.float64)
    md[:, :, 0] = 1  # every head keeps a dim
    mn = (rng.random((depth, hidden)) < 0.5).astype(np.float64)
    mn[:, 0] = 1
    mh[0, 2], md[0] = 0, 1
    mh[1] = 0
    mn[2] = 0
    md[4] = 0
    for h in range(heads):
        md[4, h, rng.choice(d, 5, replace=False)] = 1
    gates = np.ones(depth)
    gates[3] = 0
    return mh[: cfg.depth], md[: cfg.depth], mn[: cfg.depth], gates[: cfg.depth]


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# forwards jitted (one compile; op by op, each layer's own shapes compile apart). The masked forward under
# masked_norm_statistics stays op by op: the context changes how it traces, which a jit cache keyed on the config
# would not see
_forward = jax.jit(dj.models.forward, static_argnums=0)


def _masked_and_slim(cfg, params, x, mh, md, mn, gates):
    """(masked model outputs, slim model outputs, slim config, slim params, kept blocks)."""
    attn_gate, mlp_gate = slim.branch_gates(cfg, mh, md, mn)
    masked = slim.masked_params(cfg, params, mh, md, mn, attn_gate, mlp_gate)
    if cfg.scan_layers:
        ref = _forward(cfg, masked, x, gates)
    else:
        with slim.masked_norm_statistics(cfg, mh, md, mn):
            ref = dj.models.forward(cfg, masked, x, gates)
    plan = slim.plan_from_masks(cfg, mh, md, mn, gates)
    slim_cfg, slim_params, kept = slim.slice_units(cfg, params, plan)
    return ref, _forward(slim_cfg, slim_params, x), slim_cfg, slim_params, kept


def _images(cfg, dtype=np.float32, batch=2):
    return np.random.default_rng(1).normal(size=(batch, cfg.img_size, cfg.img_size, 3)).astype(dtype)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.slow
def test_masked_model_equals_slim_model_float32(kind):
    cfg, params = _model(kind)
    x = _images(cfg)
    mh, md, mn, gates = _masks(cfg)
    ref, out, slim_cfg, slim_params, kept = _masked_and_slim(cfg, params, x, mh, md, mn, gates)
    assert kept == (0, 1, 2, 4)
    d = cfg.attn_head_dim
    assert slim_cfg.layer_heads == (3, 0, 4, 4)
    assert slim_cfg.value_dims[0] == (d, d, d) and slim_cfg.value_dims[3] == (5, 5, 5, 5)
    assert len(set(slim_cfg.value_dims[2])) > 1  # uneven value widths
    assert slim_cfg.mlp_hidden[2] == 0 and slim_cfg.mlp_hidden[1] == int(mn[1].sum())
    assert "attn" not in slim_params["blocks_1"] and "norm1" not in slim_params["blocks_1"]
    assert "mlp" not in slim_params["blocks_2"] and "norm2" not in slim_params["blocks_2"]
    assert set(out) == set(ref)
    errors = {k: _rel(out[k], ref[k]) for k in ref}
    print(kind, "float32 masked vs slim", errors)
    assert max(errors.values()) <= 1e-5, errors
    full = _forward(cfg, params, x)["tokens"]
    assert _rel(out["tokens"], full) > 1e-2  # the surgery removed something real
    assert dj.prune.count_params(slim_cfg) == dj.models.count_tree(slim_params)


@pytest.mark.parametrize("kind", ["gelu", "swiglu_qv_rope", "rmsnorm_qk_norm", "attn_norm_mlp_norm"])
@pytest.mark.slow
def test_masked_model_equals_slim_model_float64(kind):
    with jax.enable_x64(True):
        cfg, params = _model(kind, np.float64, dtype="float64", param_dtype="float64")
        x = _images(cfg, np.float64)
        ref, out, *_ = _masked_and_slim(cfg, params, x, *_masks(cfg, seed=2))
        assert out["tokens"].dtype == jnp.float64
        errors = {k: _rel(out[k], ref[k]) for k in ref}
    print(kind, "float64 masked vs slim", errors)
    assert max(errors.values()) <= 1e-12, errors


def test_norms_inside_a_pruned_width_need_masked_statistics():
    """Without masked_norm_statistics, a model with qk_norm='full' is not the slim model once heads are dropped."""
    cfg, params = _model("rmsnorm_qk_norm")
    x = _images(cfg)
    mh, md, mn, gates = _masks(cfg)
    attn_gate, mlp_gate = slim.branch_gates(cfg, mh, md, mn)
    plain = _forward(cfg, slim.masked_params(cfg, params, mh, md, mn, attn_gate, mlp_gate), x, gates)
    _, out, *_ = _masked_and_slim(cfg, params, x, mh, md, mn, gates)
    assert _rel(out["tokens"], plain["tokens"]) > 1e-4


@pytest.mark.slow
def test_scanned_masked_model_and_slicing():
    cfg, params = _model("gelu", depth=3, scan_layers=True, remat=True)
    assert "blocks" in params
    x = _images(cfg)
    mh, md, mn, gates = _masks(cfg)
    mh[1], mn[1, 1] = 1, 0  # keep every branch: the layer-1 attention comes back
    gates = np.asarray([1.0, 0.0, 1.0])
    ref, out, slim_cfg, _, kept = _masked_and_slim(cfg, params, x, mh, md, mn, gates)
    assert kept == (0, 2) and not slim_cfg.scan_layers
    assert _rel(out["tokens"], ref["tokens"]) <= 1e-5
    # the scanned masked model equals the unscanned one
    loop_cfg, loop = cfg.replace(scan_layers=False, remat=False), unstack_blocks(params)
    loop_out = _forward(loop_cfg, slim.masked_params(loop_cfg, loop, mh, md, mn), x, gates)
    scan_out = _forward(cfg, slim.masked_params(cfg, params, mh, md, mn), x, gates)
    assert _rel(scan_out["tokens"], loop_out["tokens"]) <= 1e-5
    # a uniform plan keeps the stack scanned
    unit = slim.UnitPlan(True, (0, 3), ((1, 2), (0, 5)), tuple(range(0, 96, 3)))
    uni_cfg, uni, _ = slim.slice_units(cfg, params, (unit,) * 3)
    assert uni_cfg.scan_layers and uni_cfg.layer_heads == (2, 2, 2) and uni_cfg.value_dims == ((2, 2),) * 3
    assert uni["blocks"]["block"]["attn"]["proj"]["kernel"].shape == (3, 4, 64)
    loop_uni_cfg, loop_uni, _ = slim.slice_units(loop_cfg, loop, (unit,) * 3)
    np.testing.assert_array_equal(
        unstack_blocks(uni)["blocks_2"]["attn"]["qkv"]["kernel"], loop_uni["blocks_2"]["attn"]["qkv"]["kernel"]
    )
    a, b = _forward(uni_cfg, uni, x), _forward(loop_uni_cfg, loop_uni, x)
    assert _rel(a["tokens"], b["tokens"]) <= 1e-5


@pytest.mark.slow
def test_block_gates():
    cfg, params = _model("gelu", depth=3)
    x = _images(cfg)
    plain = _forward(cfg, params, x)
    ones = _forward(cfg, params, x, jnp.ones(3))
    assert _rel(ones["tokens"], plain["tokens"]) <= 1e-6
    skip = _forward(cfg, params, x, jnp.asarray([1.0, 0.0, 1.0]))
    two = {k: v for k, v in params.items() if k != "blocks_1"} | {"blocks_1": params["blocks_2"]}
    two.pop("blocks_2")
    ref = _forward(cfg.replace(depth=2, mlp_hidden=(96, 96)), two, x)
    assert _rel(skip["tokens"], ref["tokens"]) <= 1e-6
    half = _forward(cfg, params, x, jnp.asarray([1.0, 0.5, 1.0]))["tokens"]
    assert _rel(half, skip["tokens"]) > 1e-3
    scan_cfg = cfg.replace(scan_layers=True)
    scanned = _forward(scan_cfg, stack_blocks(params), x, jnp.asarray([1.0, 0.5, 1.0]))["tokens"]
    assert _rel(scanned, half) <= 1e-5
    with pytest.raises(ValueError, match=r"gates must have shape \(depth,\) = \(3,\), got \(2,\)"):
        dj.models.forward(cfg, params, x, jnp.ones(2))
    # gradients reach the gates (the search learns them)
    grad = jax.jit(jax.grad(lambda g: _forward(cfg, params, x, g)["tokens"].sum()))(jnp.ones(3))
    assert grad.shape == (3,) and np.all(np.isfinite(grad)) and np.all(grad != 0)


@pytest.mark.slow
def test_masked_params_are_differentiable_and_check_shapes():
    cfg, params = _model("swiglu_qv_rope", depth=2)
    x = _images(cfg, batch=1)
    mh, md, mn = jnp.full((2, 4), 0.5), jnp.full((2, 4, 16), 0.5), jnp.full((2, 96), 0.5)

    def loss(masks):
        return dj.models.forward(cfg, slim.masked_params(cfg, params, *masks), x)["pooled"].sum()

    grads = jax.jit(jax.grad(loss))((mh, md, mn))
    assert all(g.shape == m.shape and bool(jnp.all(jnp.isfinite(g))) for g, m in zip(grads, (mh, md, mn), strict=True))
    assert all(float(jnp.abs(g).sum()) > 0 for g in grads)
    with pytest.raises(ValueError, match=r"dim_mask \(layer 0\) must have shape \(4, 16\), got \(4, 8\)"):
        slim.masked_params(cfg, params, None, np.ones((2, 4, 8)))


def test_full_plan_returns_the_model_unchanged():
    cfg, params = _model("swiglu_qv_rope")
    same_cfg, same, kept = slim.slice_units(cfg, params, slim.full_plan(cfg))
    assert same_cfg == cfg and kept == tuple(range(5))
    assert flatten(same).keys() == flatten(params).keys()
    assert all(np.array_equal(flatten(same)[k], v) for k, v in flatten(params).items())
    # and of a slim model: slicing is idempotent under its own full plan
    slim_cfg, slim_params, _ = slim.slice_units(cfg, params, slim.plan_from_masks(cfg, *_masks(cfg)))
    again_cfg, again, _ = slim.slice_units(slim_cfg, slim_params, slim.full_plan(slim_cfg))
    assert again_cfg == slim_cfg
    assert all(np.array_equal(flatten(again)[k], v) for k, v in flatten(slim_params).items())


@pytest.mark.slow
def test_slicing_a_slim_model_again_composes():
    """Masks on a model that is already slim (uneven widths, absent branches) slice it further, exactly."""
    cfg, params = _model("gelu")
    slim_cfg, slim_params, _ = slim.slice_units(cfg, params, slim.plan_from_masks(cfg, *_masks(cfg)))
    rng = np.random.default_rng(5)
    mh = [np.ones(slim_cfg.heads(i)) for i in range(slim_cfg.depth)]
    md = [(rng.random((slim_cfg.heads(i), 16)) < 0.7).astype(float) for i in range(slim_cfg.depth)]
    for m in md:
        m[:, 0] = 1
    mn = [(rng.random(h) < 0.7).astype(float) for h in slim_cfg.mlp_hidden]
    x = _images(cfg)
    ref, out, *_ = _masked_and_slim(slim_cfg, slim_params, x, mh, md, mn, None)
    assert _rel(out["tokens"], ref["tokens"]) <= 1e-5


@pytest.mark.slow
def test_narrow_values_through_fused_attention():
    cfg, params = _model("swiglu_qv_rope")
    slim_cfg, slim_params, _ = slim.slice_units(cfg, params, slim.plan_from_masks(cfg, *_masks(cfg)))
    x = _images(cfg)
    ref = _forward(slim_cfg, slim_params, x)["tokens"]
    fused = _forward(slim_cfg.replace(attention="dot_product_attention"), slim_params, x)["tokens"]
    assert _rel(fused, ref) <= 1e-5


# ---- FLOPs: count_flops against the jaxpr's matmuls ----------------------------------------------------------------


def _subjaxprs(value):
    if hasattr(value, "eqns"):
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
        yield value.jaxpr
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _subjaxprs(v)


def _dot_flops(jaxpr) -> int:
    """2 * prod(contracting dims) * prod(output dims) of every dot_general, inner jaxprs included (a scan's body
    times its length)."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(lhs[c] for c in contract) * math.prod(eqn.outvars[0].aval.shape)
        times = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for value in eqn.params.values():
            for sub in _subjaxprs(value):
                total += times * _dot_flops(sub)
    return total


def _random_slim_config(kind: str, seed: int) -> ModelConfig:
    fields = dict(KINDS[kind], depth=4)
    cfg = dj.models.preset(fields.pop("name"), **fields)
    rng = np.random.default_rng(seed)
    heads = [int(h) for h in rng.integers(0, cfg.num_heads + 1, cfg.depth)]
    hidden = [int(h) for h in rng.integers(0, 97, cfg.depth)]
    hidden = [h or 7 if not n else h for h, n in zip(hidden, heads, strict=True)]
    widths = tuple(tuple(int(w) for w in rng.integers(1, cfg.attn_head_dim + 1, h)) for h in heads)
    return cfg.replace(layer_heads=tuple(heads), value_dims=widths, mlp_hidden=tuple(hidden), remat=seed % 2 == 1)


@pytest.mark.parametrize("kind,seed", [(k, s) for k in sorted(KINDS) for s in range(2)])
def test_count_flops_equals_the_jaxpr_matmuls(kind, seed):
    cfg = _random_slim_config(kind, seed)
    shapes = dj.models.param_shapes(cfg)
    x = jax.ShapeDtypeStruct((1, cfg.img_size, cfg.img_size, 3), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda p, im: dj.models.forward(cfg, p, im))(shapes, x).jaxpr
    assert _dot_flops(jaxpr) == dj.prune.count_flops(cfg)
    assert dj.prune.count_params(cfg) == dj.models.count_tree(shapes)
    per = dj.prune.count_flops(cfg, per_layer=True)
    assert per["total"] == sum(per["layers"]) + per["embed"] + per["head"]
    # an absent branch costs nothing
    for i in range(cfg.depth):
        macs = dj.prune.layer_macs(cfg, i)
        assert (macs["qkv"] == 0) == (cfg.heads(i) == 0) and (macs["fc1"] == 0) == (cfg.mlp_hidden[i] == 0)


def test_count_flops_of_a_scanned_uniform_slim_model():
    cfg = dj.models.preset(
        "vit_tiny_patch16_224", **dict(_SMALL, depth=3), layer_heads=(2,) * 3, value_dims=((3, 3),) * 3
    ).replace(scan_layers=True)
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda p, im: dj.models.forward(cfg, p, im))(dj.models.param_shapes(cfg), x).jaxpr
    assert _dot_flops(jaxpr) == dj.prune.count_flops(cfg)
    n, d = 5, 64
    assert dj.prune.layer_macs(cfg, 0) == dict(
        qkv=n * d * (2 * 32 + 6), qk=n * n * 32, av=n * n * 6, proj=n * 6 * d, fc1=n * d * 96, fc2=n * 96 * d
    )


# ---- config ---------------------------------------------------------------------------------------------------------


def test_config_units_and_json_round_trip():
    cfg = dj.models.preset(
        "vit_tiny_patch16_224",
        **dict(_SMALL, depth=3),
        layer_heads=(4, 0, 2),
        value_dims=((16, 3, 16, 1), (), (7, 16)),
        mlp_hidden=(96, 12, 0),
    )
    assert [cfg.heads(i) for i in range(3)] == [4, 0, 2]
    assert cfg.vdims(1) == () and cfg.vdims(2) == (7, 16) and not cfg.uniform and not cfg.full_units
    back = ModelConfig.from_json(cfg.to_json())
    assert back == cfg and isinstance(back.value_dims[0], tuple)
    assert json.loads(cfg.to_json())["value_dims"] == [[16, 3, 16, 1], [], [7, 16]]
    plain = dj.models.preset("vit_tiny_patch16_224", depth=2)
    assert plain.vdims(1) == (64, 64, 64) and plain.uniform and plain.full_units
    assert dj.models.logical_axes(cfg)["blocks_0"]["attn"]["qkv"]["kernel"] == jax.sharding.PartitionSpec(
        "embed", "heads"
    )
    assert dj.models.param_shapes(cfg)["blocks_0"]["attn"]["qkv"]["kernel"].shape == (64, 2 * 64 + 36)


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(layer_heads=(4, 4)), "layer_heads has 2 entries but depth is 3"),
        (dict(layer_heads=(4, 5, 4)), r"layer_heads entries must be in 0..num_heads=4, got \(4, 5, 4\)"),
        (dict(layer_heads=(4, -1, 4)), "layer_heads entries must be in 0..num_heads=4"),
        (dict(value_dims=((16,) * 4,) * 2), "value_dims has 2 entries but depth is 3"),
        (
            dict(layer_heads=(4, 2, 4), value_dims=((16,) * 4,) * 3),
            r"value_dims\[1\] has 4 widths but layer 1 has 2 heads",
        ),
        (
            dict(value_dims=((16,) * 4, (16, 0, 16, 16), (16,) * 4)),
            r"value_dims\[1\] entries must be in 1..attn_head_dim=16",
        ),
        (
            dict(value_dims=((16,) * 4, (16, 17, 16, 16), (16,) * 4)),
            r"value_dims\[1\] entries must be in 1..attn_head_dim",
        ),
        (dict(mlp_hidden=(96, -1, 96)), r"mlp_hidden entries must be >= 0, got \(96, -1, 96\)"),
        (dict(layer_heads=(4, 0, 4), mlp_hidden=(96, 0, 96)), r"layers \[1\] have neither attention heads"),
        (dict(layer_heads=(4, 2, 4), scan_layers=True), "scan_layers needs the same heads, value widths and MLP width"),
        (
            dict(value_dims=((16,) * 4, (16, 8, 16, 16), (16,) * 4), scan_layers=True),
            "scan_layers needs the same heads",
        ),
    ],
)
def test_config_unit_errors_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        dj.models.preset("vit_tiny_patch16_224", **dict(_SMALL, depth=3), **fields)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(heads=(1, 0)), r"plan layer 0: heads \(1, 0\) must be sorted"),
        (dict(heads=(0, 4)), r"heads \(0, 4\) must be sorted, unique and in 0..3"),
        (dict(dims=((0,),)), "dims has 1 entries but 2 heads are kept"),
        (dict(dims=((0,), ())), "head 1 keeps value dims \\(\\); they must be non-empty"),
        (dict(dims=((0,), (16,))), "head 1 keeps value dims \\(16,\\)"),
        (dict(neurons=(3, 2)), "plan layer 0: neurons must be sorted"),
        (dict(heads=(), dims=(), neurons=()), "keeps neither heads nor neurons"),
    ],
)
def test_plan_errors(change, message):
    cfg = dj.models.preset("vit_tiny_patch16_224", **dict(_SMALL, depth=2))
    plan = list(slim.full_plan(cfg))
    base = slim.UnitPlan(True, (0, 1), ((0,), (0, 1)), (0, 1))
    plan[0] = slim.UnitPlan(**{**base.__dict__, **change})
    with pytest.raises(ValueError, match=message):
        slim.slice_units(cfg, dj.models.init_params(cfg), plan)
    with pytest.raises(ValueError, match="the plan has 1 layers but the model has depth 2"):
        slim.check_plan(cfg, plan[:1])


# ---- model directories and the report -------------------------------------------------------------------------------


def test_slim_model_directory_round_trip_and_report(tmp_path):
    cfg, params = _model("swiglu_qv_rope")
    plan = slim.plan_from_masks(cfg, *_masks(cfg))
    slim_cfg, slim_params, kept = slim.slice_units(cfg, params, plan)
    save_model(tmp_path / "m", slim_cfg, slim_params, family="timm", uvc={"blocks": list(kept)})
    loaded_cfg, loaded = load_model(tmp_path / "m")
    assert loaded_cfg == slim_cfg
    assert flatten(loaded).keys() == flatten(slim_params).keys()
    for k, v in flatten(slim_params).items():
        got = flatten(loaded)[k]
        assert got.dtype == v.dtype and np.array_equal(got, v), k
    source = dj.open_model(tmp_path / "m")
    assert source.cfg == slim_cfg and source.meta["uvc"]["blocks"] == [0, 1, 2, 4]
    assert "mlp" not in source.block(2) and np.array_equal(
        source.block(3)["attn"]["proj"]["kernel"], slim_params["blocks_3"]["attn"]["proj"]["kernel"]
    )
    x = _images(cfg)
    np.testing.assert_array_equal(
        _forward(slim_cfg, source.load(), x)["tokens"], _forward(slim_cfg, slim_params, x)["tokens"]
    )

    rows = unit_rows(cfg, slim_cfg, kept)
    assert [r["kept"] for r in rows] == [True, True, True, False, True]
    assert rows[0]["heads_before"] == 4 and rows[0]["heads_after"] == 3 and rows[1]["heads_after"] == 0
    assert rows[2]["hidden_after"] == 0 and rows[4]["value_dims"] == [5, 5, 5, 5]
    assert rows[4]["value_width_before"] == 64 and rows[4]["value_width_after"] == 20
    info = write_unit_report(tmp_path, cfg, slim_cfg, kept)
    assert info["removed_blocks"] == [3] and info["flops_saved_pct"] > 0
    md = (tmp_path / "prune_report.md").read_text()
    assert "| 3 | removed | removed | removed |" in md and "| 1 | 4 -> 0 |" in md
    assert json.loads((tmp_path / "prune_report.json").read_text())["layers"][4]["value_dims"] == [5, 5, 5, 5]
