"""`export --format transformers`: a model as the folder transformers' save_pretrained writes (config.json, and
model.safetensors or shards past a size with model.safetensors.index.json), for the classes of hf_config.EXPORTS.

The class is the model's own (hf_dinov2, hf_clip) or, for a model from another family, the one whose PyTorch model
holds every part of it (a DINOv2-like timm ViT: Dinov2Model; a CLIP-like one: CLIPVisionModel). The config.json
written is read back through hf_config.CLASSES and must give the model's config, so the folder computes what the
model does; anything else is refused in one line naming --format torch, before the weights are read.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from dgmr_jax.core.errors import UserError
from dgmr_jax.core.paths import PathLike
from dgmr_jax.io.checkpoint_io import save_safetensors
from dgmr_jax.io.convert import resolve_config, to_torch
from dgmr_jax.io.hf_config import CLASSES, CONFIG_FILE, EXPORTS, PREPROCESSOR_FILE
from dgmr_jax.io.keymaps import foreign_parts, torch_prefix
from dgmr_jax.io.source import LayerSource
from dgmr_jax.io.torch_export import check_new_folder, write_folder
from dgmr_jax.models.config import ModelConfig
from dgmr_jax.models.preprocess import Preprocess
from dgmr_jax.models.tree import Params, flatten, is_scanned, unflatten, unstack_blocks

DEFAULT_SHARD = "50GB"  # transformers 5's save_pretrained default
WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
# fields that do not change what the model computes at its image size: how it was named, laid out and run, and the
# filter that resamples its positions for another size (the exported model resamples as its class does)
_UNCOMPARED = (
    *("name", "qkv_fused", "mlp_packed", "dtype", "param_dtype", "scan_layers", "remat", "attention"),
    "pos_resample_antialias",
    "pos_resample_offset",
)
_TORCH_WAY = "export it with --format torch"


def shard_bytes(size: str) -> int:
    """A --max-shard-size in bytes: a count of bytes, or with transformers' units (decimal KB / MB / GB, binary
    KiB / MiB / GiB; "5GB", "500MiB")."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]i?B|B)?\s*", size, re.IGNORECASE)
    if not match or int(match.group(1)) <= 0:
        raise UserError(f"--max-shard-size must be a positive size such as 5GB, 500MB or 2GiB, got {size!r}")
    return int(match.group(1)) * _UNITS[(match.group(2) or "").upper()]


def _fitted(cfg: ModelConfig, family: str) -> ModelConfig:
    """cfg as the family's class holds it: DINOv2's mask token (zeros where cfg has none) and, where cfg's positions
    cover the patches alone, a zero position for the class token (the same sums)."""
    prefix = 1 if cfg.pos_embed_prefix == 0 and cfg.class_token else cfg.pos_embed_prefix
    return resolve_config(cfg, family).replace(pos_embed_prefix=prefix)


def _fitted_params(cfg: ModelConfig, fitted: ModelConfig, params: Params) -> Params:
    """params with the zero mask token and zero class-token position that _fitted adds."""
    flat = flatten(unstack_blocks(params) if is_scanned(params) else params)
    pos = np.asarray(flat["pos_embed"])
    if fitted.mask_token and not cfg.mask_token:
        flat["mask_token"] = np.zeros((1, cfg.width), pos.dtype)
    if fitted.pos_embed_prefix > cfg.pos_embed_prefix:
        flat["pos_embed"] = np.concatenate([np.zeros((1, 1, cfg.width), pos.dtype), pos], axis=1)
    return unflatten(flat)


def _as_computed(cfg: ModelConfig) -> dict[str, Any]:
    """cfg's fields with those that do not act as the forward sees them: head_dim resolved, no head bias without a
    head, no rotary settings without rotary embeddings."""
    rope = {} if cfg.rope else dict(rope_ref_grid=0, rope_temperature=0.0)
    head_bias = cfg.head_bias or not cfg.num_classes
    return dataclasses.asdict(cfg.replace(head_dim=cfg.attn_head_dim, head_bias=head_bias, **rope))


def _differences(cfg: ModelConfig, back: ModelConfig) -> list[str]:
    """The fields (compared as computed) where `back`, the class's reading of the config.json, is not cfg."""
    a, b = _as_computed(cfg), _as_computed(back)
    return [f"{k} {a[k]!r} (the class: {b[k]!r})" for k in a if k not in _UNCOMPARED and a[k] != b[k]]


def _plan(cfg: ModelConfig, family: str) -> tuple[ModelConfig, dict[str, Any]]:
    """(the config the class computes, its config.json) of cfg as `family`'s class; a UserError saying what the
    class lacks."""
    fitted = _fitted(cfg, family)
    foreign = foreign_parts(fitted, family)
    if foreign:
        raise UserError(f"it has {', '.join(foreign)}")
    config = EXPORTS[family].config(fitted)
    read = CLASSES[config["architectures"][0]][1](config, lambda: ())  # the classes written read no tensor names
    back = resolve_config(read, family).replace(name=cfg.name)
    differences = _differences(fitted, back)
    if differences:
        raise UserError(f"its config.json would read back as another model: {'; '.join(differences)}")
    return back, config


def transformers_plan(cfg: ModelConfig, model_family: str) -> tuple[str, ModelConfig, dict[str, Any]]:
    """(family, the config the class computes, its config.json) of the class that holds cfg, from the config alone:
    the model's own hf family, else the first of EXPORTS whose class holds it; one-line UserError otherwise."""
    if not cfg.full_units:
        raise UserError(
            f"model {cfg.name} is a UVC slim model (per-layer heads, value widths or removed blocks), which no "
            f"transformers class holds; {_TORCH_WAY}"
        )
    if len(set(cfg.mlp_hidden)) > 1:
        raise UserError(
            f"model {cfg.name} has per-layer MLP widths {list(cfg.mlp_hidden)}, but transformers' "
            f"{', '.join(e.label for e in EXPORTS.values())} give every layer one MLP width; {_TORCH_WAY}"
        )
    own = model_family in EXPORTS
    lacks = []
    for family in [model_family] if own else list(EXPORTS):
        try:
            return family, *_plan(cfg, family)
        except UserError as err:
            lacks.append(f"as {EXPORTS[family].label} {err}" if not own else str(err))
    fits = f"cannot be written as transformers' {EXPORTS[model_family].label}" if own else "fits no transformers class"
    raise UserError(f"model {cfg.name} (family {model_family}) {fits}: {'; '.join(lacks)}; {_TORCH_WAY}")


def shards(sd: dict[str, np.ndarray], max_bytes: int) -> list[dict[str, np.ndarray]]:
    """sd split in order as save_pretrained splits it: a shard is closed before a tensor that would take it past
    max_bytes (so a tensor larger than that has a shard of its own)."""
    out: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, value in sd.items():
        if out[-1] and size + value.nbytes > max_bytes:
            out.append({})
            size = 0
        out[-1][name] = value
        size += value.nbytes
    return out


def _write(folder: Path, configs: dict[str, dict[str, Any]], parts: list[dict[str, np.ndarray]]) -> None:
    """The config files ({name: content}), and the weights as save_pretrained names them: one model.safetensors,
    or numbered shards and their index."""
    for name, config in configs.items():
        (folder / name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if len(parts) == 1:
        save_safetensors(folder / WEIGHTS, parts[0], metadata={"format": "pt"})
        return
    weight_map = {}
    for i, part in enumerate(parts):
        name = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        save_safetensors(folder / name, part, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, name)
    sizes = [v for part in parts for v in part.values()]
    metadata = {"total_parameters": sum(int(v.size) for v in sizes), "total_size": sum(v.nbytes for v in sizes)}
    index = {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def export_transformers(source: LayerSource, out: PathLike, max_shard_size: str | None = None) -> str:
    """Write `source` as a transformers model folder in the new local folder `out`, in shards of at most
    max_shard_size (default DEFAULT_SHARD); the folder and the class are checked before the weights are read.
    Returns one line saying what was written and how to load it."""
    max_bytes = shard_bytes(max_shard_size or DEFAULT_SHARD)
    check_new_folder(out, "transformers")
    cfg = source.cfg
    family, back, config = transformers_plan(cfg, source.meta.get("family", "timm"))
    name = config["architectures"][0]
    prefix = torch_prefix(family) if name in EXPORTS[family].prefixed else ""
    sd = to_torch(back, _fitted_params(cfg, _fitted(cfg, family), source.load()), family, prefix=prefix)
    config["dtype"] = str(next(iter(sd.values())).dtype)
    configs = {CONFIG_FILE: config}
    if source.meta.get("preprocess"):
        configs[PREPROCESSOR_FILE] = EXPORTS[family].processor(Preprocess.from_meta(source.meta), cfg.img_size)
    parts = shards(sd, max_bytes)
    path = write_folder(out, lambda folder: _write(folder, configs, parts))
    files = WEIGHTS if len(parts) == 1 else f"{len(parts)} shards and {INDEX}"
    params = sum(int(v.size) for v in sd.values())
    processor = configs.get(PREPROCESSOR_FILE, {}).get("image_processor_type")
    processor = f"{PREPROCESSOR_FILE} ({processor}), " if processor else ""
    return (
        f"wrote {path}: {CONFIG_FILE} ({name}), {processor}{files} ({len(sd)} tensors, {params / 1e6:.2f} M "
        f"params); load it with transformers.{name}.from_pretrained({str(path)!r})"
    )
