"""Named architectures (timm / open_clip / EVA-CLIP / InternViT names) as ModelConfig settings."""

from __future__ import annotations

from typing import Any

from dgmr_jax.core.errors import UserError
from dgmr_jax.models.config import ModelConfig

_TIMM_VIT = dict(num_classes=1000)
_DINOV2 = dict(img_size=518, patch_size=14, layer_scale=True, num_classes=0)
_EVA = dict(patch_size=14, qkv_bias="qv")
_EVA02 = dict(
    _EVA,
    mlp_type="swiglu",
    rope=True,
    rope_ref_grid=16,
    global_pool="avg",
    fc_norm=True,
    final_norm=False,
    num_classes=0,
)
_OPEN_CLIP = dict(norm_eps=1e-5, patch_bias=False, pre_norm=True)
# baaivision/EVA EVA-CLIP-18B model_configs: RMSNorm everywhere, fused qkv without bias, GELU MLP, class-token
# pooling after the final norm, head without bias (its bias follows qkv_bias); 18B adds post-norm blocks
_EVA_CLIP_BIG = dict(patch_size=14, qkv_bias="none", norm="rmsnorm", head_bias=False)
# OpenGVLab InternVisionModel: layer scale, no final norm (pooled = token 0), position grid resized without
# antialiasing; the 6B uses RMSNorm and RMSNorm on q/k over the full width, the 300M LayerNorm and a qkv bias
_INTERNVIT = dict(img_size=448, patch_size=14, layer_scale=True, final_norm=False, pos_resample_antialias=False)
# SigLIP / SigLIP 2 (transformers SiglipVisionModel, timm vit_*_siglip_*): no class token, learned positions for the
# patches only, tanh-approximate GELU, final norm, then the attention pool; the head's MLP is as wide as the blocks'.
# timm builds its siglip models with the erf GELU: its names (vit_*_siglip_*) compute what timm computes.
_SIGLIP = dict(class_token=False, pos_embed_prefix=0, global_pool="map", mlp_type="gelu_tanh", num_classes=0)
# The "384 px" so400m towers cut 384 px into 27 x 27 patches of 14 px, their patch conv dropping the last 6 rows and
# columns: as a ModelConfig (img_size a multiple of patch_size) that is the same 27 x 27 grid at 378 px
_SO400M = dict(_SIGLIP, img_size=378, patch_size=14, width=1152, depth=27, num_heads=16, hidden=4304)

# Each entry: ModelConfig fields, with `hidden` (one MLP width for every layer) in place of mlp_hidden.
PRESETS: dict[str, dict[str, Any]] = {
    "vit_tiny_patch16_224": dict(_TIMM_VIT, width=192, depth=12, num_heads=3, hidden=768),
    "vit_small_patch16_224": dict(_TIMM_VIT, width=384, depth=12, num_heads=6, hidden=1536),
    "vit_base_patch16_224": dict(_TIMM_VIT, width=768, depth=12, num_heads=12, hidden=3072),
    "vit_large_patch16_224": dict(_TIMM_VIT, width=1024, depth=24, num_heads=16, hidden=4096),
    "vit_base_patch16_clip_224": dict(
        _TIMM_VIT, width=768, depth=12, num_heads=12, hidden=3072, pre_norm=True, patch_bias=False, norm_eps=1e-5
    ),
    "deit_tiny_patch16_224": dict(_TIMM_VIT, width=192, depth=12, num_heads=3, hidden=768),
    "deit_small_patch16_224": dict(_TIMM_VIT, width=384, depth=12, num_heads=6, hidden=1536),
    "deit_base_patch16_224": dict(_TIMM_VIT, width=768, depth=12, num_heads=12, hidden=3072),
    "deit_small_distilled_patch16_224": dict(
        _TIMM_VIT, width=384, depth=12, num_heads=6, hidden=1536, dist_token=True, pos_embed_prefix=2
    ),
    "vit_small_patch14_dinov2": dict(_DINOV2, width=384, depth=12, num_heads=6, hidden=1536),
    "vit_base_patch14_dinov2": dict(_DINOV2, width=768, depth=12, num_heads=12, hidden=3072),
    "vit_large_patch14_dinov2": dict(_DINOV2, width=1024, depth=24, num_heads=16, hidden=4096),
    "vit_small_patch14_reg4_dinov2": dict(
        _DINOV2, width=384, depth=12, num_heads=6, hidden=1536, reg_tokens=4, pos_embed_prefix=0
    ),
    "vit_giant_patch14_dinov2": dict(
        _DINOV2, width=1536, depth=40, num_heads=24, hidden=4096, mlp_type="swiglu", mlp_packed=True
    ),
    "eva02_small_patch14_224": dict(_EVA02, width=384, depth=12, num_heads=6, hidden=1024, mlp_packed=True),
    "eva02_base_patch14_224": dict(
        _EVA02, width=768, depth=12, num_heads=12, hidden=2048, mlp_norm=True, qkv_fused=False
    ),
    "eva02_large_patch14_224": dict(
        _EVA02, width=1024, depth=24, num_heads=16, hidden=2730, mlp_norm=True, qkv_fused=False
    ),
    "eva_giant_patch14_clip_224": dict(_EVA, width=1408, depth=40, num_heads=16, hidden=6144, num_classes=1024),
    "eva02_enormous_patch14_clip_224": dict(
        _EVA, width=1792, depth=64, num_heads=16, hidden=15360, post_norm=True, num_classes=1024
    ),
    "ViT-B-32": dict(_OPEN_CLIP, patch_size=32, width=768, depth=12, num_heads=12, hidden=3072, proj_dim=512),
    "ViT-B-16": dict(_OPEN_CLIP, patch_size=16, width=768, depth=12, num_heads=12, hidden=3072, proj_dim=512),
    "ViT-L-14": dict(_OPEN_CLIP, patch_size=14, width=1024, depth=24, num_heads=16, hidden=4096, proj_dim=768),
    "ViT-g-14": dict(_OPEN_CLIP, patch_size=14, width=1408, depth=40, num_heads=16, hidden=6144, proj_dim=1024),
    "ViT-bigG-14": dict(_OPEN_CLIP, patch_size=14, width=1664, depth=48, num_heads=16, hidden=8192, proj_dim=1280),
    "EVA-CLIP-8B": dict(_EVA_CLIP_BIG, width=4096, depth=32, num_heads=32, hidden=20480, num_classes=1280),
    "EVA-CLIP-8B-448": dict(
        _EVA_CLIP_BIG, img_size=448, width=4096, depth=32, num_heads=32, hidden=20480, num_classes=1280
    ),
    "EVA-CLIP-18B": dict(
        _EVA_CLIP_BIG, width=5120, depth=48, num_heads=40, hidden=25600, num_classes=1536, post_norm=True
    ),
    # V1-5 onwards keep 45 of the 48 trained blocks; the 224 px V1-0 towers are depth=48, img_size=224 overrides
    "InternViT-6B-448px-V2_5": dict(
        _INTERNVIT,
        width=3200,
        depth=45,
        num_heads=25,
        hidden=12800,
        norm="rmsnorm",
        qk_norm="full",
        qkv_bias="none",
    ),
    "InternViT-300M-448px-V2_5": dict(_INTERNVIT, width=1024, depth=24, num_heads=16, hidden=4096),
    "siglip-base-patch16-224": dict(_SIGLIP, width=768, depth=12, num_heads=12, hidden=3072),
    "vit_base_patch16_siglip_224": dict(_SIGLIP, width=768, depth=12, num_heads=12, hidden=3072, mlp_type="gelu"),
    "vit_so400m_patch14_siglip_384": dict(_SO400M, mlp_type="gelu"),
    "siglip-so400m-patch14-384": _SO400M,
    # fixed-resolution SigLIP 2 checkpoints are SiglipModel checkpoints of the same architecture
    "siglip2-so400m-patch14-384": _SO400M,
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """ModelConfig for a named architecture; overrides (e.g. depth=2, img_size=64) replace fields.

    `hidden=` sets one MLP width for every layer; `mlp_hidden=` sets them per layer.
    """
    if name not in PRESETS:
        raise UserError(f"unknown architecture {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    fields = {**PRESETS[name], "name": name, **overrides}
    hidden = fields.pop("hidden")
    fields.setdefault("mlp_hidden", (hidden,) * fields.get("depth", 12))
    return ModelConfig(**fields)
