"""PyTorch checkpoint import (from_torch) and export (to_torch) for timm, open_clip, EVA-CLIP, DINOv2; CLIP
text towers (text_from_torch / text_to_torch)."""

from dgmr_jax.convert.checkpoint_io import CheckpointError, load_state_dict
from dgmr_jax.convert.core import from_torch, resolve_config, to_torch
from dgmr_jax.convert.keymaps import FAMILIES
from dgmr_jax.convert.text import text_from_torch, text_to_torch

__all__ = [
    "FAMILIES",
    "CheckpointError",
    "from_torch",
    "load_state_dict",
    "resolve_config",
    "text_from_torch",
    "text_to_torch",
    "to_torch",
]
