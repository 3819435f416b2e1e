"""A timm VisionTransformer rebuilt for a UVC slim config: per-layer Attention (num_heads, attn_head_dim) and Mlp
(hidden width) in the padded form that dgmr_jax.convert.to_torch writes (dgmr_jax.models.slim.padded_config)."""

from __future__ import annotations

from reference import TIMM_SMALL, timm, torch

from dgmr_jax.models.config import ModelConfig
from dgmr_jax.models.slim import padded_config


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
