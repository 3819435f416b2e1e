"""from_torch / to_torch: PyTorch state dicts <-> (ModelConfig, Flax params), strict and exact."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from dgmr_jax.convert.checkpoint_io import CheckpointError, load_state_dict
from dgmr_jax.convert.hooks import HOOKS
from dgmr_jax.convert.keymaps import DERIVED, FAMILIES, Rule, rules, torch_prefix
from dgmr_jax.models.config import ModelConfig
from dgmr_jax.models.presets import preset
from dgmr_jax.models.tree import flatten, is_scanned, stack_blocks, unflatten, unstack_blocks
from dgmr_jax.models.vit import param_shapes

Params = dict[str, Any]
_LISTED = 12  # names shown per kind of mismatch in an error


def resolve_config(arch: str | ModelConfig, family: str) -> ModelConfig:
    """The config for arch as stored in family's layout (DINOv2's own layout keeps the mask token and
    gives the class token, not the registers, a position embedding)."""
    if family not in FAMILIES:
        raise CheckpointError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    cfg = arch if isinstance(arch, ModelConfig) else preset(arch)
    if family == "dinov2":
        cfg = cfg.replace(mask_token=True, pos_embed_prefix=1)
    return cfg


def _vision_entries(sd: dict[str, np.ndarray], family: str) -> dict[str, np.ndarray]:
    """The vision tower's entries, prefix removed, derived buffers dropped."""
    prefix = torch_prefix(family)
    if prefix and any(k.startswith(prefix) for k in sd):
        sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    derived = DERIVED.get(family)
    return {k: v for k, v in sd.items() if not (derived and derived.search(k))}


def _listing(kind: str, names: list[str]) -> str:
    shown = ", ".join(names[:_LISTED]) + (f", ... ({len(names) - _LISTED} more)" if len(names) > _LISTED else "")
    return f"  {len(names)} {kind}: {shown}"


def _closest_family(sd: Mapping[str, Any], arch: str | ModelConfig, family: str) -> str:
    """A hint naming another family whose key layout fits the checkpoint exactly, if any."""
    for other in FAMILIES:
        if other == family:
            continue
        other_cfg = resolve_config(arch, other)
        expected = {k for r in rules(other_cfg, other) for k in r.torch}
        if expected == set(_vision_entries(dict(sd), other)):
            return f"\nThe keys fit family={other!r}: pass that instead."
    return ""


def _match(sd: dict[str, np.ndarray], cfg: ModelConfig, family: str) -> tuple[list[Rule], list[str]]:
    """The family's rules for cfg, and the problems (missing / unexpected / mis-shaped) with sd."""
    table = rules(cfg, family)
    expected = {k for r in table for k in r.torch}
    problems = []
    missing = sorted(expected - set(sd))
    unexpected = sorted(set(sd) - expected)
    if missing:
        problems.append(_listing("missing keys", missing))
    if unexpected:
        problems.append(_listing("unexpected keys", unexpected))
    return table, problems


def from_torch(
    src: str | os.PathLike | Mapping[str, Any],
    family: str = "timm",
    arch: str | ModelConfig = "vit_base_patch16_224",
    strict: bool = True,
) -> tuple[ModelConfig, Params]:
    """Import a PyTorch checkpoint (path or mapping) of `family` into (config, Flax params).

    strict: missing, unexpected and mis-shaped keys raise one CheckpointError that lists them all;
    with strict=False only keys that fit are loaded and the rest keep their random init.
    Arrays keep the checkpoint's dtype, so to_torch(from_torch(sd)) reproduces sd bit for bit.
    """
    cfg = resolve_config(arch, family)
    raw = load_state_dict(src)
    sd = _vision_entries(raw, family)
    table, problems = _match(sd, cfg, family)
    shapes = flatten(param_shapes(cfg.replace(scan_layers=False)))
    flat: dict[str, np.ndarray] = {}
    misshaped = []
    for rule in table:
        if not all(k in sd for k in rule.torch):
            continue
        for path, value in zip(rule.flax, HOOKS[rule.hook][0]([sd[k] for k in rule.torch]), strict=True):
            want = tuple(shapes[path].shape)
            if value.shape != want:
                misshaped.append(f"{'+'.join(rule.torch)} {tuple(value.shape)} -> {path} expects {want}")
            else:
                flat[path] = value
    if misshaped:
        problems.append(_listing("mis-shaped keys", misshaped))
    if problems and strict:
        raise CheckpointError(
            f"checkpoint does not match family={family!r}, arch={cfg.name!r}:\n"
            + "\n".join(problems)
            + _closest_family(raw, arch, family)
        )
    if not strict and len(flat) < len(shapes):
        from dgmr_jax.models.vit import init_params

        flat = {**flatten(init_params(cfg.replace(scan_layers=False))), **flat}
    params = unflatten(flat)
    return cfg, stack_blocks(params) if cfg.scan_layers else params


def to_torch(cfg: ModelConfig, params: Params, family: str = "timm", prefix: str = "") -> dict[str, np.ndarray]:
    """Export Flax params to a state dict {name: np.ndarray} in family's PyTorch layout.

    Works for pruned configs: widths come from the arrays, so the dict loads into the PyTorch model
    built with the same per-layer widths. `prefix` (e.g. "visual.") is put before every name.
    """
    if family not in FAMILIES:
        raise CheckpointError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    flat = {k: np.asarray(v) for k, v in flatten(unstack_blocks(params) if is_scanned(params) else params).items()}
    table = rules(cfg, family)
    used = {p for r in table for p in r.flax}
    missing, extra = sorted(used - set(flat)), sorted(set(flat) - used)
    if missing or extra:
        problems = ([_listing("params missing", missing)] if missing else []) + (
            [_listing("params not in the config", extra)] if extra else []
        )
        raise CheckpointError(f"params do not match config {cfg.name!r}:\n" + "\n".join(problems))
    sd = {}
    for rule in table:
        for name, value in zip(rule.torch, HOOKS[rule.hook][1]([flat[p] for p in rule.flax]), strict=True):
            sd[prefix + name] = value
    return sd
