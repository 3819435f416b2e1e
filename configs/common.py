"""Recipes import their shared defaults from here (the package holds them, so the demo can use them too)."""

from dgmr_jax.distill.defaults import IMAGENET_TRAIN, base_config, steps

__all__ = ["IMAGENET_TRAIN", "base_config", "steps"]
