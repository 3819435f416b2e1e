"""Public import path of model directories (the code lives in dgmr_jax.io.model_dir)."""

from dgmr_jax.io.model_dir import check_new_dir, load_config, load_model, load_params, save_model

__all__ = ["check_new_dir", "load_config", "load_model", "load_params", "save_model"]
