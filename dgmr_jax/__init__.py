"""dgmr-jax: DGMR and UVC compression of large vision transformers in JAX/Flax."""

from dgmr_jax import convert, models, prune

__version__ = "0.1.0"
__all__ = ["convert", "models", "prune", "__version__"]
