"""dgmr-jax: DGMR and UVC compression of large vision transformers in JAX/Flax."""

from dgmr_jax import convert, demo, models, prune  # noqa: F401  demo: registers its ONNX teacher with open_model
from dgmr_jax.data.open import open_images
from dgmr_jax.io.open import open_model

__version__ = "0.1.0"
__all__ = ["convert", "models", "open_images", "open_model", "prune", "__version__"]
