"""The Flax ViT encoder, its config and named presets."""

from dgmr_jax.models.config import ModelConfig
from dgmr_jax.models.presets import PRESETS, preset
from dgmr_jax.models.vit import (
    VisionTransformer,
    count_tree,
    forward,
    init_params,
    logical_axes,
    param_shapes,
)

__all__ = [
    "PRESETS",
    "ModelConfig",
    "VisionTransformer",
    "count_tree",
    "forward",
    "init_params",
    "logical_axes",
    "param_shapes",
    "preset",
]
