"""ModelConfig.attention: jax.nn.dot_product_attention computes what the einsum path computes, values and grads."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dgmr_jax as dj
from dgmr_jax.models.config import ModelConfig
from dgmr_jax.models.tree import stack_blocks

TOL = 1e-5

# timm ViT (class token), DINOv2 with 4 registers (class + register prefix, layer scale), EVA02 (RoPE on patch
# tokens only, SwiGLU, q/v bias, avg pool) and OpenCLIP (pre-norm, projection); two blocks, small images
FAMILIES = {
    "vit_tiny_patch16_224": dict(img_size=32),
    "vit_small_patch14_reg4_dinov2": dict(img_size=42),
    "eva02_small_patch14_224": dict(img_size=56),
    "ViT-B-16": dict(img_size=32, width=128, num_heads=4, hidden=256),
}


def _model(name: str, **overrides):
    cfg = dj.models.preset(name, depth=2, **FAMILIES[name], **overrides)
    params = dj.models.init_params(cfg, 0)
    # weights well above the 0.02 init, so the attention weights are far from uniform and every term matters
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    leaves = [p + 0.1 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys, strict=True)]
    images = jax.random.normal(jax.random.PRNGKey(2), (2, cfg.img_size, cfg.img_size, 3))
    return cfg, jax.tree_util.tree_unflatten(treedef, leaves), images


def _rel(a, b) -> float:
    """max |a - b| / max |b| over a whole tree."""
    pairs = list(zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))
    return max(float(np.abs(x - y).max()) for x, y in pairs) / max(float(np.abs(y).max()) for _, y in pairs)


def _loss(cfg: ModelConfig, params, images) -> jax.Array:
    """A scalar of every output (pooled, all tokens, logits) with fixed random weights."""
    out = dj.models.forward(cfg, params, images)
    total = 0.0
    for i, key in enumerate(sorted(out)):
        w = jax.random.normal(jax.random.PRNGKey(10 + i), out[key].shape)
        total = total + jnp.sum(w * out[key])
    return total


# jitted: one compile per model, where op-by-op execution compiles every op of every layer on its own
_forward = jax.jit(dj.models.forward, static_argnums=0)
_grad = jax.jit(jax.grad(_loss, argnums=1), static_argnums=0)


@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.slow
def test_dot_product_attention_matches_einsum(name):
    cfg, params, images = _model(name)
    fused = cfg.replace(attention="dot_product_attention")
    ref = _forward(cfg, params, images)
    out = _forward(fused, params, images)
    assert set(out) == set(ref)
    for key in ref:
        assert _rel(out[key], ref[key]) <= TOL, (key, _rel(out[key], ref[key]))
    ref_grads = _grad(cfg, params, images)
    grads = _grad(fused, params, images)
    assert _rel(grads, ref_grads) <= TOL, _rel(grads, ref_grads)


@pytest.mark.slow  # over 10 s here (a 2-block model built and run twice)
def test_attention_matters():
    """The test weights make attention non-trivial: a wrong logit scale changes the outputs well above TOL."""
    cfg, params, images = _model("eva02_small_patch14_224")
    ref = dj.models.forward(cfg, params, images)["tokens"]
    scaled = jax.tree_util.tree_map(lambda x: x, params)  # new containers, same arrays
    qkv = params["blocks_0"]["attn"]["qkv"]["kernel"]
    scaled["blocks_0"]["attn"]["qkv"]["kernel"] = qkv.at[:, : cfg.attn_dim].multiply(1.5)  # q only: logits x1.5
    assert _rel(dj.models.forward(cfg, scaled, images)["tokens"], ref) > 1e3 * TOL


@pytest.mark.slow
def test_scanned_remat_stack():
    """Under nn.scan and remat (the big-model settings) the fused path still matches, grads included."""
    cfg, params, images = _model("vit_tiny_patch16_224")
    scan_cfg = cfg.replace(scan_layers=True, remat=True)
    stacked = stack_blocks(params)
    ref = jax.grad(lambda p: _loss(scan_cfg, p, images))(stacked)
    got = jax.grad(lambda p: _loss(scan_cfg.replace(attention="dot_product_attention"), p, images))(stacked)
    assert _rel(got, ref) <= TOL


def test_config_field():
    cfg = dj.models.preset("vit_tiny_patch16_224", depth=2, attention="dot_product_attention")
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    old = json.loads(cfg.to_json())
    del old["attention"]  # a config.json written before the field existed
    assert ModelConfig.from_dict(old).attention == "einsum"
    with pytest.raises(ValueError, match="attention must be one of"):
        cfg.replace(attention="flash")


@pytest.mark.slow  # over 10 s here (a 2-block model built and run twice)
def test_cudnn_needs_half_precision():
    cfg, params, images = _model("vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="needs dtype bfloat16 or float16"):
        dj.models.forward(cfg.replace(attention="cudnn"), params, images)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs an NVIDIA GPU")
@pytest.mark.parametrize("name", ["vit_small_patch14_reg4_dinov2", "eva02_small_patch14_224"])
def test_cudnn_matches_einsum_on_gpu(name):
    cfg, params, images = _model(name, dtype="bfloat16")
    ref = dj.models.forward(cfg.replace(dtype="float32"), params, images)["tokens"]
    bf16 = dj.models.forward(cfg, params, images)["tokens"].astype(jnp.float32)
    flash = dj.models.forward(cfg.replace(attention="cudnn"), params, images)["tokens"].astype(jnp.float32)
    assert _rel(flash, ref) <= 2 * max(_rel(bf16, ref), 1e-2)
