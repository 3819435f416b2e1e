"""Parameter and FLOP accounting of a vision tower, per layer and total, from the config alone."""

from __future__ import annotations

from dgmr_jax.models.config import ModelConfig
from dgmr_jax.models.vit import count_tree, param_shapes


def count_params(cfg: ModelConfig) -> int:
    """Number of parameters of the vision tower (abstract build: no memory is allocated)."""
    return count_tree(param_shapes(cfg))


def layer_macs(cfg: ModelConfig, layer: int, img_size: int | None = None) -> dict[str, int]:
    """Multiply-accumulates of one block's matmul slots for one image (norms and softmax excluded).

    Per-layer units (UVC): queries and keys have heads(layer) * attn_head_dim columns, values sum(vdims(layer));
    an absent branch (0 heads, 0 MLP neurons) costs nothing.
    """
    grid = (img_size or cfg.img_size) // cfg.patch_size
    n, d, h = cfg.num_prefix_tokens + grid * grid, cfg.width, cfg.mlp_hidden[layer]
    qk, v = cfg.heads(layer) * cfg.attn_head_dim, sum(cfg.vdims(layer))
    return {
        "qkv": n * d * (2 * qk + v),
        "qk": n * n * qk,
        "av": n * n * v,
        "proj": n * v * d,
        "fc1": n * d * h * (2 if cfg.gated else 1),
        "fc2": n * h * d,
    }


def _pool_macs(cfg: ModelConfig, img_size: int | None = None) -> int:
    """Multiply-accumulates of the attention-pool head (global_pool="map") for one image, 0 for other pools: q of
    the probe, k and v of the patch tokens, the probe's attention over them, proj and the head's MLP."""
    if cfg.global_pool != "map":
        return 0
    patches, d = ((img_size or cfg.img_size) // cfg.patch_size) ** 2, cfg.width
    return d * d + patches * d * 2 * d + 2 * patches * d + d * d + 2 * d * cfg.pool_hidden


def count_flops(cfg: ModelConfig, img_size: int | None = None, per_layer: bool = False) -> int | dict:
    """FLOPs (2 x MACs) of one forward pass of one image.

    per_layer=True returns {"layers": [per-block FLOPs], "embed": patch embedding, "head": attention pool, head
    and projection, "total": sum}; otherwise the total.
    """
    grid = (img_size or cfg.img_size) // cfg.patch_size
    layers = [2 * sum(layer_macs(cfg, i, img_size).values()) for i in range(cfg.depth)]
    embed = 2 * grid * grid * 3 * cfg.patch_size**2 * cfg.width
    head = 2 * cfg.width * (cfg.num_classes * (2 if cfg.dist_token else 1) + cfg.proj_dim)
    head += 2 * _pool_macs(cfg, img_size)
    total = sum(layers) + embed + head
    if per_layer:
        return {"layers": layers, "embed": embed, "head": head, "total": total}
    return total
