"""Public import path of PyTorch checkpoint import (from_torch) and export (to_torch) for timm, open_clip,
EVA-CLIP, DINOv2, and of CLIP text towers (text_from_torch / text_to_torch); the code lives in dgmr_jax.io."""

from dgmr_jax.io.checkpoint_io import CheckpointError, load_state_dict
from dgmr_jax.io.convert import from_torch, resolve_config, to_torch
from dgmr_jax.io.keymaps import FAMILIES
from dgmr_jax.io.text_convert import text_from_torch, text_to_torch

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
