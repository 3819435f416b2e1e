"""Read PyTorch-style checkpoints (.safetensors with numpy only; .pth/.pt/.bin/.ckpt/.pth.tar through torch) as
numpy, unwrapping the training-checkpoint structures around the weights; Hugging Face directories and sharded
checkpoints (an index .json naming each tensor's shard) are read one shard at a time."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from dgmr_jax.core.errors import UserError
from dgmr_jax.core.paths import check_writable, is_uri

# .tar covers the ImageNet-example convention "checkpoint.pth.tar" (a torch zip file, not a tar archive).
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")
# Harmless classes that training scripts pickle beside the weights; torch.load(weights_only=True) refuses
# every other global, so an arbitrary pickle never runs code here.
SAFE_GLOBALS = (argparse.Namespace,)
# Keys under which training scripts keep the weights, in order of preference: the raw weights
# (Lightning/timm "state_dict", DeiT/MAE "model", DeepSpeed "module", "params") before the EMA copies.
_WRAPPER_KEYS = ("state_dict", "model", "module", "params", "model_ema", "state_dict_ema")
# Values that may sit beside top-level tensors and are dropped (e.g. "epoch": 3 next to the weights).
_METADATA = (int, float, str, bytes, type(None), argparse.Namespace)
# Prefixes that wrappers add to every key: DDP/DataParallel "module.", torch.compile "_orig_mod.".
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_MAX_NESTING = 4  # wrapper levels searched; real checkpoints use one or two


class CheckpointError(UserError):
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


def _find_weights(obj: Any, depth: int = 0) -> Mapping[str, Any] | None:
    """The mapping of names to tensors in obj: obj itself when every value is a tensor, else the first wrapper
    key (in _WRAPPER_KEYS order) that holds one, else obj's tensors when the rest is plain metadata; None if none."""
    if isinstance(obj, SafetensorsFile):
        return obj
    if not isinstance(obj, Mapping) or not obj or depth > _MAX_NESTING:
        return None
    tensors = {k: v for k, v in obj.items() if hasattr(v, "shape")}
    if len(tensors) == len(obj):
        return obj
    for key in _WRAPPER_KEYS:
        found = _find_weights(obj[key], depth + 1) if key in obj else None
        if found is not None:
            return found
    if tensors and all(isinstance(v, _METADATA) for k, v in obj.items() if k not in tensors):
        return tensors
    return None


def _strip_prefixes(sd: Mapping[str, Any]) -> Mapping[str, Any]:
    """Drop the DDP/DataParallel ("module.") and torch.compile ("_orig_mod.") prefixes shared by every key,
    in any order and nesting (DDP of a compiled model saves "module._orig_mod.")."""
    while True:
        prefix = next((p for p in _WRAPPER_PREFIXES if all(isinstance(k, str) and k.startswith(p) for k in sd)), None)
        if prefix is None:
            return sd
        sd = {k[len(prefix) :]: v for k, v in sd.items()}


def _describe(value: Any) -> str:
    if isinstance(value, Mapping):
        return f"{type(value).__name__} of {len(value)}"
    return type(value).__name__


def _unwrap(obj: Any, source: str) -> Mapping[str, Any]:
    """The state dict inside a checkpoint (see _find_weights), with wrapper key prefixes removed."""
    found = _find_weights(obj)
    if found is not None:
        return _strip_prefixes(found)
    if isinstance(obj, Mapping):
        shown = [f"{k!r} ({_describe(v)})" for k, v in list(obj.items())[:12]]
        more = f" and {len(obj) - 12} more" if len(obj) > 12 else ""
        got = f"top-level keys {', '.join(shown)}{more}" if obj else "an empty mapping"
    else:
        got = type(obj).__name__
    raise CheckpointError(
        f"{source} is not a checkpoint: expected a mapping of parameter names to tensors, optionally under one "
        f"of the keys {', '.join(_WRAPPER_KEYS)} or beside plain metadata (numbers, strings, argparse.Namespace); "
        f"got {got}"
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


def save_safetensors(
    path: str | os.PathLike, arrays: Mapping[str, np.ndarray], metadata: dict[str, str] | None = None
) -> None:
    """Write {name: array} as .safetensors with numpy alone (bfloat16 included), via a temporary file; `metadata`
    is the header's __metadata__ (transformers writes {"format": "pt"})."""
    names = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}
    header, offset = ({"__metadata__": metadata} if metadata else {}), 0
    for key, value in arrays.items():
        value = np.asarray(value)
        if value.dtype not in names:
            raise UserError(f"{key}: dtype {value.dtype} cannot be stored in safetensors")
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


STATE_DICT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def check_state_dict_path(path: str | os.PathLike) -> None:
    """Raise unless `path` is new, can be written and ends in a suffix save_state_dict writes."""
    if os.path.exists(path):
        raise FileExistsError(f"{path} already exists; choose another --out or remove it first")
    if os.path.splitext(os.fspath(path))[1] not in STATE_DICT_SUFFIXES:
        raise UserError(f"--out must end in .safetensors, .pth, .pt or .bin, got {os.path.basename(path)}")
    check_writable(path, "--out")


def save_state_dict(path: str | os.PathLike, sd: Mapping[str, np.ndarray]) -> None:
    """Write {name: array} as a PyTorch state dict, chosen by suffix: .safetensors with numpy alone, .pth / .pt /
    .bin through torch.save (bfloat16 arrays become bfloat16 tensors, bit-exact)."""
    check_state_dict_path(path)
    if os.fspath(path).endswith(".safetensors"):
        save_safetensors(path, sd)
        return
    import torch

    def tensor(a: np.ndarray) -> torch.Tensor:
        if a.dtype.name == "bfloat16":
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(np.ascontiguousarray(a))

    torch.save({k: tensor(v) for k, v in sd.items()}, path)


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
    """torch.load with weights_only=True and only SAFE_GLOBALS allowed; a refused global names itself."""
    try:
        import torch
    except ImportError as err:
        raise CheckpointError(
            f"reading {path} needs PyTorch: pip install 'dgmr-jax[torch]', or convert it to .safetensors"
        ) from err
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            try:  # mmap keeps memory at what is read; files in the legacy (pre-zip) format cannot be mapped
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad file; all mean the same to a user
        refused = re.search(r"GLOBAL ([\w.]+)", str(err)) if isinstance(err, pickle.UnpicklingError) else None
        if refused:
            allowed = ", ".join(f"{c.__module__}.{c.__qualname__}" for c in SAFE_GLOBALS)
            raise CheckpointError(
                f"{path} pickles {refused.group(1)}, which is not allowed: only tensors, plain containers and "
                f"{allowed} are loaded, because unpickling arbitrary objects can run arbitrary code. Save the "
                f"weights alone (torch.save(model.state_dict(), path)) or as .safetensors, from a trusted copy"
            ) from err
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from err


# What a Hugging Face directory holds, in order of preference: a shard index, else one weights file.
HF_WEIGHTS = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


class ShardedCheckpoint(Mapping):
    """Lazy view of a sharded checkpoint through its index (transformers' "weight_map": name -> shard file): key
    names come from the index alone; a tensor opens only its own shard (.safetensors: that tensor's bytes;
    .bin: the shard memory-mapped, one shard kept open at a time), so a 6B model is never read whole."""

    def __init__(self, index: str):
        self.path, folder = index, os.path.dirname(index)
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            self._shard = {str(k): os.path.join(folder, str(v)) for k, v in weight_map.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{index} is not a shard index (a JSON object with a weight_map): {err}") from err
        absent = sorted({f for f in self._shard.values() if not os.path.isfile(f)})
        if absent:
            raise CheckpointError(f"{index} names shards that are not there: {', '.join(absent[:4])}")
        self._open: tuple[str, Mapping[str, Any]] | None = None

    def _file(self, shard: str) -> Mapping[str, Any]:
        """The shard's tensors; the last shard stays open, so a layer's entries usually open one file once."""
        if self._open is None or self._open[0] != shard:
            self._open = None  # drop the previous shard before the next is mapped
            self._open = (shard, open_state_dict(shard))
        return self._open[1]

    def __getitem__(self, key: str) -> np.ndarray:
        try:
            return self._file(self._shard[key])[key]
        except KeyError as err:  # the index is read first; a shard that lacks its entry is a broken download
            raise CheckpointError(f"{self.path} places {key} in {self._shard[key]}, which does not hold it") from err

    def __iter__(self):
        return iter(self._shard)

    def __len__(self) -> int:
        return len(self._shard)


def weights_in(directory: str) -> str:
    """The checkpoint file of a Hugging Face directory (HF_WEIGHTS), or a CheckpointError listing what it needs."""
    for name in HF_WEIGHTS:
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    raise CheckpointError(f"{directory} holds no checkpoint: expected one of {', '.join(HF_WEIGHTS)}")


def open_state_dict(src: str | os.PathLike | Mapping[str, Any]) -> Mapping[str, np.ndarray]:
    """A state dict {name: numpy array} from a path or a mapping; safetensors entries load lazily. A path may be
    a directory (Hugging Face layout, HF_WEIGHTS) or a shard index (*.index.json), read shard by shard.

    Training checkpoints are unwrapped: the weights may sit under a wrapper key (state_dict, model, module,
    params, model_ema, state_dict_ema; the first that holds tensors wins) beside epochs, optimizer state or an
    argparse.Namespace, and "module." / "_orig_mod." prefixes shared by every key are removed. To read another
    entry (e.g. the EMA weights), load the checkpoint yourself and pass that mapping.
    """
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if is_uri(path):
            raise CheckpointError(
                f"{path}: PyTorch checkpoints are read from local disk; copy it first (gcloud storage cp)"
            )
        if os.path.isdir(path):
            path = weights_in(path)
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint {path} does not exist")
        if path.endswith(".index.json"):
            return ShardedCheckpoint(path)
        if path.endswith(".safetensors"):
            return SafetensorsFile(path)
        if not path.endswith(TORCH_SUFFIXES):
            raise CheckpointError(
                f"{path}: unknown checkpoint type; expected a directory, a shard index (*.index.json), "
                f".safetensors or one of {TORCH_SUFFIXES}"
            )
        src = _unwrap(_load_torch(path), path)
    else:
        src = _unwrap(src, "the given mapping")
    return _Converted(src)


def load_state_dict(src: str | os.PathLike | Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A state dict as {name: numpy array}, fully read into memory."""
    return dict(open_state_dict(src).items())
