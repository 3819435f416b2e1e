"""The Flax ViT encoder, its config and named presets; the CLIP text tower (text.py) and tokenizer."""

from dgmr_jax.models.config import ModelConfig
from dgmr_jax.models.presets import PRESETS, preset
from dgmr_jax.models.slim import Plan, UnitPlan, full_plan, masked_params, slice_units
from dgmr_jax.models.text import TEXT_PRESETS, TextConfig, encode_text, resolve_text_config
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
    "TEXT_PRESETS",
    "ModelConfig",
    "Plan",
    "TextConfig",
    "UnitPlan",
    "VisionTransformer",
    "count_tree",
    "encode_text",
    "forward",
    "full_plan",
    "init_params",
    "logical_axes",
    "masked_params",
    "param_shapes",
    "preset",
    "resolve_text_config",
    "slice_units",
]
