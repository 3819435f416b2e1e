"""UVC test helpers: a plan with every kind of unit, and a timm VisionTransformer rebuilt for a UVC slim config:
per-layer Attention (num_heads, attn_head_dim) and Mlp (hidden width) in the padded form that
dgmr_jax.convert.to_torch writes (dgmr_jax.models.slim.padded_config)."""

from __future__ import annotations

import numpy as np
from reference import TIMM_SMALL, timm, torch

from dgmr_jax.models.config import ModelConfig
from dgmr_jax.models.slim import Plan, padded_config, plan_from_masks


def mixed_plan(cfg: ModelConfig, seed: int = 0) -> Plan:
    """A plan for a 5-layer cfg with every kind of UVC unit: layer 0 drops a head (full widths), 1 its attention,
    2 its MLP (uneven value widths), 3 the block, 4 narrows every head's values to 7 dims."""
    rng = np.random.default_rng(seed)
    heads, d, hidden = cfg.num_heads, cfg.attn_head_dim, cfg.mlp_hidden[0]
    mh = np.ones((5, heads))
    md = (rng.random((5, heads, d)) < 0.5).astype(float)
    md[:, :, 0] = 1
    mn = (rng.random((5, hidden)) < 0.5).astype(float)
    mh[0, 1], md[0] = 0, 1
    mh[1] = 0
    mn[2] = 0
    md[4] = 0
    md[4, :, :7] = 1
    return plan_from_masks(cfg, mh, md, mn, gates=[1, 1, 1, 0, 1])


def timm_slim(name: str, slim_cfg: ModelConfig) -> torch.nn.Module:
    """timm's `name` (shrunk as tests/reference.TIMM_SMALL) at the slim depth, each block's attention and MLP
    replaced by timm's own Attention / Mlp at that layer's padded sizes; params uninitialized-random, load a
    state dict into it."""
    from timm.layers import Attention, Mlp

    img, kw = TIMM_SMALL[name]
    padded, _ = padded_config(slim_cfg)
    model = timm.create_model(name, pretrained=False, img_size=img, depth=padded.depth, **kw)
    for i, block in enumerate(model.blocks):
        old_attn, old_mlp = block.attn, block.mlp
        block.attn = Attention(
            padded.width,
            num_heads=padded.heads(i),
            attn_head_dim=padded.attn_head_dim,
            qkv_bias=old_attn.qkv.bias is not None,
        )
        block.mlp = Mlp(padded.width, hidden_features=padded.mlp_hidden[i], act_layer=type(old_mlp.act))
    return model.eval()
