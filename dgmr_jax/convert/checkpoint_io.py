"""Read PyTorch-style checkpoints (.safetensors with numpy only; .pth/.pt/.bin through torch) as numpy."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# Wrappers that training scripts put around the weights.
_WRAPPER_KEYS = ("state_dict", "model", "module", "model_ema", "params")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the requested architecture."""


def to_numpy(value: Any) -> np.ndarray:
    """A torch tensor, jax or numpy array as numpy; bfloat16 stays bfloat16 (bit-exact)."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        t = value.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            return t.contiguous().view(dtype=__import__("torch").int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    return np.asarray(value)


def _unwrap(obj: Any, source: str) -> Mapping[str, Any]:
    while isinstance(obj, Mapping):
        if obj and all(hasattr(v, "shape") for v in obj.values()):
            return obj
        inner = next((obj[k] for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            break
        obj = inner
    raise CheckpointError(
        f"{source} is not a checkpoint: expected a mapping of parameter names to tensors "
        f"(optionally under one of {_WRAPPER_KEYS}), got {type(obj).__name__}"
    )


def _load_file(path: str) -> Any:
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{path} is not a readable safetensors checkpoint ({err})") from err
    if path.endswith(TORCH_SUFFIXES):
        try:
            import torch
        except ImportError as err:
            raise CheckpointError(
                f"reading {path} needs PyTorch: pip install 'dgmr-jax[torch]', or convert it to .safetensors"
            ) from err
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
        except Exception as err:  # torch raises many types for a bad file; all mean the same to a user
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from err
    raise CheckpointError(f"{path}: unknown checkpoint type; expected .safetensors or one of {TORCH_SUFFIXES}")


def load_state_dict(src: str | os.PathLike | Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A state dict as {name: numpy array} from a path or an in-memory mapping of tensors/arrays."""
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint {path} does not exist")
        src = _unwrap(_load_file(path), path)
    else:
        src = _unwrap(src, "the given mapping")
    return {k: to_numpy(v) for k, v in src.items()}
