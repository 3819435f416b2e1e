"""Read PyTorch-style checkpoints (.safetensors with numpy only; .pth/.pt/.bin through torch) as numpy."""

from __future__ import annotations

import json
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
        if str(t.dtype) == "torch.bfloat16":  # numpy has no bfloat16: reinterpret the bits
            import torch

            return t.contiguous().view(dtype=torch.int16).numpy().view(ml_dtypes.bfloat16)
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


_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class SafetensorsFile(Mapping):
    """Lazy read-only view of a .safetensors file: the header is parsed once, each tensor is read
    from disk only when asked for (plain reads, no mmap, so memory holds just what the caller keeps).
    Handles bfloat16 with numpy alone (safetensors' numpy loader cannot)."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
            self._base = 8 + size
            header.pop("__metadata__", None)
            self._entries = {k: (v["dtype"], tuple(v["shape"]), v["data_offsets"]) for k, v in header.items()}
            end = max((e[2][1] for e in self._entries.values()), default=0)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, MemoryError) as err:
            raise CheckpointError(f"{path} is not a readable safetensors checkpoint (bad header: {err})") from err
        if self._base + end > os.path.getsize(path):
            raise CheckpointError(f"{path} is not a readable safetensors checkpoint (truncated: data ends early)")

    def __getitem__(self, key: str) -> np.ndarray:
        dtype, shape, (start, stop) = self._entries[key]
        if dtype not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {key} has unsupported dtype {dtype}")
        with open(self.path, "rb") as f:
            f.seek(self._base + start)
            data = np.fromfile(
                f,
                dtype=_SAFETENSORS_DTYPES[dtype],
                count=(stop - start) // np.dtype(_SAFETENSORS_DTYPES[dtype]).itemsize,
            )
        return data.reshape(shape)

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def save_safetensors(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    """Write {name: array} as .safetensors with numpy alone (bfloat16 included), via a temporary file."""
    names = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}
    header, offset = {}, 0
    for key, value in arrays.items():
        value = np.asarray(value)
        if value.dtype not in names:
            raise ValueError(f"{key}: dtype {value.dtype} cannot be stored in safetensors")
        header[key] = {
            "dtype": names[value.dtype],
            "shape": list(value.shape),
            "data_offsets": [offset, offset + value.nbytes],
        }
        offset += value.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = f"{os.fspath(path)}.partial"
    with open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for value in arrays.values():
            f.write(np.ascontiguousarray(value).tobytes())
    os.replace(tmp, path)


class _Converted(Mapping):
    """A mapping of tensors seen as numpy arrays, converted one entry at a time on access."""

    def __init__(self, inner: Mapping[str, Any]):
        self._inner = inner

    def __getitem__(self, key: str) -> np.ndarray:
        return to_numpy(self._inner[key])

    def __iter__(self):
        return iter(self._inner)

    def __len__(self) -> int:
        return len(self._inner)


def _load_torch(path: str) -> Any:
    try:
        import torch
    except ImportError as err:
        raise CheckpointError(
            f"reading {path} needs PyTorch: pip install 'dgmr-jax[torch]', or convert it to .safetensors"
        ) from err
    try:
        try:  # mmap keeps memory at what is read; files in the legacy (pre-zip) format cannot be mapped
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad file; all mean the same to a user
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from err


def open_state_dict(src: str | os.PathLike | Mapping[str, Any]) -> Mapping[str, np.ndarray]:
    """A state dict {name: numpy array} from a path or a mapping; safetensors entries load lazily."""
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint {path} does not exist")
        if path.endswith(".safetensors"):
            return SafetensorsFile(path)
        if not path.endswith(TORCH_SUFFIXES):
            raise CheckpointError(f"{path}: unknown checkpoint type; expected .safetensors or one of {TORCH_SUFFIXES}")
        src = _unwrap(_load_torch(path), path)
    else:
        src = _unwrap(src, "the given mapping")
    return _Converted(src)


def load_state_dict(src: str | os.PathLike | Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A state dict as {name: numpy array}, fully read into memory."""
    return dict(open_state_dict(src).items())
