"""from_torch / to_torch: PyTorch state dicts <-> (ModelConfig, Flax params), strict and exact."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dgmr_jax.io.checkpoint_io import CheckpointError, open_state_dict
from dgmr_jax.io.hooks import HOOKS
from dgmr_jax.io.keymaps import (
    DERIVED,
    FAMILIES,
    Rule,
    export_families,
    foreign_parts,
    rules,
    torch_beside,
    torch_prefix,
)
from dgmr_jax.io.source import LayerSource
from dgmr_jax.models.config import ModelConfig
from dgmr_jax.models.presets import preset
from dgmr_jax.models.slim import needs_padding, pad_units, padded_config, slice_units
from dgmr_jax.models.tree import Params, flatten, is_scanned, stack_blocks, unflatten, unstack_blocks
from dgmr_jax.models.vit import init_params, param_shapes, set_image_size

_LISTED = 12  # names shown per kind of mismatch in an error
# How each family's own loader resamples a position grid for another image size: antialiased bicubic (timm's
# resample_abs_pos_embed, open_clip's resize_pos_embed) or plain bicubic (EVA-CLIP's resize_eva_pos_embed,
# facebookresearch DINOv2, InternViT, transformers' Dinov2, CLIP and SigLIP); align_corners=False in all of them
POS_ANTIALIAS = dict(
    timm=True,
    open_clip=True,
    eva_clip=False,
    dinov2=False,
    internvit=False,
    hf_dinov2=False,
    hf_clip=False,
    hf_siglip=False,
    hf_siglip2=False,  # transformers resizes Siglip2 positions bilinearly (antialiased): read at the grid's size
    hf_evaclip=False,  # as eva_clip (the remote code's embeddings take only their own image size)
)
# facebookresearch DINOv2's interpolate_pos_encoding (interpolate_offset, default 0.1) calls F.interpolate with
# scale_factor=(new grid + 0.1) / grid, not size=new grid; the other families' loaders pass the size (offset 0)
POS_OFFSET = dict(dinov2=0.1)
_BLOCK = re.compile(r"^blocks_(\d+)/")


def resolve_config(arch: str | ModelConfig, family: str) -> ModelConfig:
    """The config for arch (preset name, config .json path or ModelConfig) as stored in family's layout.

    DINOv2's own layouts (facebookresearch's and transformers') keep the mask token and give the class token, not
    the registers, a position embedding. The position grid is resampled as the family's own loader does it
    (POS_ANTIALIAS, POS_OFFSET)."""
    if family not in FAMILIES:
        raise CheckpointError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    if isinstance(arch, ModelConfig):
        cfg = arch
    elif arch.endswith(".json"):  # a ModelConfig written by ModelConfig.to_json (custom depth, widths, ...)
        cfg = ModelConfig.from_json(Path(arch).read_text())
    else:
        cfg = preset(arch)
    if family in ("dinov2", "hf_dinov2"):
        cfg = cfg.replace(mask_token=True, pos_embed_prefix=1)
    return cfg.replace(pos_resample_antialias=POS_ANTIALIAS[family], pos_resample_offset=POS_OFFSET.get(family, 0.0))


class RenamedEntries(Mapping):
    """Some entries of a checkpoint under new names ({new: original}); values are fetched from the
    underlying (possibly lazy) state dict only when read."""

    def __init__(self, sd: Mapping[str, np.ndarray], names: dict[str, str]):
        self._sd, self._names = sd, names

    def __getitem__(self, key: str) -> np.ndarray:
        return self._sd[self._names[key]]

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class VisionEntries(RenamedEntries):
    """The vision tower's entries of a checkpoint: family prefix removed, derived buffers dropped, the entries that
    sit beside the prefix (torch_beside) kept under their own names."""

    def __init__(self, sd: Mapping[str, np.ndarray], family: str):
        prefix = torch_prefix(family)
        if not (prefix and any(k.startswith(prefix) for k in sd)):
            prefix = ""
        derived = DERIVED.get(family)
        names = {
            k[len(prefix) :]: k
            for k in sd
            if k.startswith(prefix) and not (derived and derived.search(k[len(prefix) :]))
        }
        names |= {k: k for k in torch_beside(family) if prefix and k in sd}
        super().__init__(sd, names)


def listing(kind: str, names: list[str]) -> str:
    shown = ", ".join(names[:_LISTED]) + (f", ... ({len(names) - _LISTED} more)" if len(names) > _LISTED else "")
    return f"  {len(names)} {kind}: {shown}"


def _closest_family(sd: Mapping[str, Any], arch: str | ModelConfig, family: str) -> str:
    """A hint naming another family whose key layout fits the checkpoint exactly, if any."""
    for other in FAMILIES:
        if other == family:
            continue
        other_cfg = resolve_config(arch, other)
        expected = {k for r in rules(other_cfg, other) for k in r.torch}
        if expected == set(VisionEntries(sd, other)):
            return f"\nThe keys fit family={other!r}: pass that instead."
    return ""


def check_keys(sd: Mapping[str, Any], table: list[Rule]) -> list[str]:
    """Missing and unexpected torch names of sd against the rules (no tensor is read)."""
    expected = {k for r in table for k in r.torch}
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    return ([listing("missing keys", missing)] if missing else []) + (
        [listing("unexpected keys", unexpected)] if unexpected else []
    )


def convert_rules(
    sd: Mapping[str, np.ndarray], table: list[Rule], shapes: dict[str, Any]
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Apply the rules whose torch entries are all present: ({flax path: array}, mis-shaped notes)."""
    flat, misshaped = {}, []
    for rule in table:
        if not all(k in sd for k in rule.torch):
            continue
        for path, value in zip(rule.flax, HOOKS[rule.hook][0]([sd[k] for k in rule.torch]), strict=True):
            want = tuple(shapes[path].shape)
            if value.shape != want:
                misshaped.append(f"{'+'.join(rule.torch)} {tuple(value.shape)} -> {path} expects {want}")
            else:
                flat[path] = value
    return flat, misshaped


def mismatch_error(problems: list[str], family: str, arch: str | ModelConfig, cfg: ModelConfig, raw) -> CheckpointError:
    """One error listing every problem; when key names are off, name a family whose layout fits."""
    names_off = any("missing keys" in p or "unexpected keys" in p for p in problems)
    return CheckpointError(
        f"checkpoint does not match family={family!r}, arch={cfg.name!r}:\n"
        + "\n".join(problems)
        + (_closest_family(raw, arch, family) if names_off else "")
    )


def checkpoint_image_size(sd: Mapping[str, np.ndarray], cfg: ModelConfig, family: str) -> ModelConfig:
    """cfg at the image size the checkpoint's position grid was trained for (e.g. DINOv2 at 518 px)."""
    (pos_rule,) = [r for r in rules(cfg, family) if r.flax == ("pos_embed",)]
    if pos_rule.torch[0] not in sd:
        return cfg
    patches = sd[pos_rule.torch[0]].shape[-2] - cfg.pos_embed_prefix
    side = math.isqrt(max(patches, 0))
    if side * side != patches or side == cfg.grid:
        return cfg
    return cfg.replace(img_size=side * cfg.patch_size)


class CheckpointSource(LayerSource):
    """A PyTorch checkpoint of `family` as a layer source: key names are checked against the rules when it is
    opened (nothing read yet), tensors are converted one block at a time (.safetensors read lazily)."""

    def __init__(self, src: str | os.PathLike | Mapping[str, Any], family: str, arch: str | ModelConfig):
        cfg = resolve_config(arch, family)
        self._raw = open_state_dict(src)
        self._sd = VisionEntries(self._raw, family)
        self.cfg = checkpoint_image_size(self._sd, cfg, family)
        self.meta = {"family": family, "source": "state dict" if isinstance(src, Mapping) else os.fspath(src)}
        self.family, self.arch = family, arch
        self.shapes = flatten(param_shapes(self.cfg.replace(scan_layers=False)))
        self._key_problems: list[str] | None = None
        self._rules: dict[int | None, list[Rule]] = {}
        for rule in rules(self.cfg, family):
            m = _BLOCK.match(rule.flax[0])
            self._rules.setdefault(int(m.group(1)) if m else None, []).append(rule)

    @property
    def table(self) -> list[Rule]:
        return [r for group in self._rules.values() for r in group]

    def key_problems(self) -> list[str]:
        """Missing and unexpected torch names against the rules (no tensor is read; checked once)."""
        if self._key_problems is None:
            self._key_problems = check_keys(self._sd, self.table)
        return list(self._key_problems)

    def error(self, problems: list[str]) -> CheckpointError:
        return mismatch_error(problems, self.family, self.arch, self.cfg, self._raw)

    def convert(self, key: int | None | str = "all") -> tuple[dict[str, np.ndarray], list[str]]:
        """({flax path: array}, mis-shaped notes) of block `key`, the non-block params (None) or "all"."""
        return convert_rules(self._sd, self.table if key == "all" else self._rules[key], self.shapes)

    def _strict(self, key: int | None) -> Params:
        problems = self.key_problems()
        flat, misshaped = self.convert(key)
        if misshaped:
            problems.append(listing("mis-shaped keys", misshaped))
        if problems:
            raise self.error(problems)
        return unflatten(flat)

    def top(self) -> Params:
        return self._strict(None)

    def block(self, i: int) -> Params:
        return self._strict(i)[f"blocks_{i}"]


def from_torch(
    src: str | os.PathLike | Mapping[str, Any],
    family: str = "timm",
    arch: str | ModelConfig = "vit_base_patch16_224",
    strict: bool = True,
    img_size: int | None = None,
) -> tuple[ModelConfig, Params]:
    """Import a PyTorch checkpoint (path or mapping) of `family` into (config, Flax params).

    The config's image size follows the checkpoint's position grid; `img_size` then resamples the
    grid (bicubic, as timm does on load) to run the model at another resolution.

    strict: missing, unexpected and mis-shaped keys raise one CheckpointError that lists them all;
    with strict=False only keys that fit are loaded and the rest keep their random init.
    Arrays keep the checkpoint's dtype, so to_torch(from_torch(sd)) reproduces sd bit for bit.

    A UVC slim `arch` (narrowed value widths or absent branches) reads the padded form that to_torch writes and
    slices it back (dgmr_jax.models.slim.pad_units), checking that the padding is exactly zero.
    """
    resolved = resolve_config(arch, family)
    if not resolved.full_units:
        _check_unit_family(resolved, family)
        if needs_padding(resolved):
            return _from_padded(src, family, resolved, strict, img_size)
    source = CheckpointSource(src, family, arch)
    cfg, problems = source.cfg, source.key_problems()
    flat, misshaped = source.convert()
    if misshaped:
        problems.append(listing("mis-shaped keys", misshaped))
    if problems and strict:
        raise source.error(problems)
    if not strict and len(flat) < len(source.shapes):
        flat = {**flatten(init_params(cfg.replace(scan_layers=False))), **flat}
    params = unflatten(flat)
    if img_size is not None:
        cfg, params = set_image_size(cfg, params, img_size)
    return cfg, stack_blocks(params) if cfg.scan_layers else params


def export_rules(flat: dict[str, Any], table: list[Rule], config_name: str) -> dict[str, np.ndarray]:
    """{torch name: array} from flat Flax params through the rules' inverse hooks; params that the rules
    do not cover, or that they need but are absent, raise one CheckpointError listing them."""
    flat = {k: np.asarray(v) for k, v in flat.items()}
    used = {p for r in table for p in r.flax}
    missing, extra = sorted(used - set(flat)), sorted(set(flat) - used)
    if missing or extra:
        problems = ([listing("params missing", missing)] if missing else []) + (
            [listing("params not in the config", extra)] if extra else []
        )
        raise CheckpointError(f"params do not match config {config_name!r}:\n" + "\n".join(problems))
    return {
        name: value
        for rule in table
        for name, value in zip(rule.torch, HOOKS[rule.hook][1]([flat[p] for p in rule.flax]), strict=True)
    }


def to_torch(cfg: ModelConfig, params: Params, family: str = "timm", prefix: str = "") -> dict[str, np.ndarray]:
    """Export Flax params to a state dict {name: np.ndarray} in family's PyTorch layout.

    Works for pruned configs: widths come from the arrays, so the dict loads into the PyTorch model
    built with the same per-layer widths. `prefix` (e.g. "visual.") is put before every name but those that sit
    beside the tower (torch_beside: "vision_model." gives CLIPVisionModelWithProjection's names).

    UVC slim configs (family "timm" only): per-layer heads become per-layer num_heads; narrowed value widths are
    padded to attn_head_dim with exact zeros (v rows of qkv, v_bias, proj input columns) and an absent branch is
    written as an all-zero 1-head attention / width-1 MLP (norm and layer scale zero too), so the timm model
    computes the slim model's function; its config is dgmr_jax.models.slim.padded_config(cfg)[0].
    """
    check_layout(cfg, family)
    if needs_padding(cfg):
        cfg, params, _ = pad_units(cfg, params)
    flat = flatten(unstack_blocks(params) if is_scanned(params) else params)
    beside = torch_beside(family)
    sd = export_rules(flat, rules(cfg, family), cfg.name)
    return {(name if name in beside else prefix + name): value for name, value in sd.items()}


def check_layout(cfg: ModelConfig, family: str, model_family: str = "") -> None:
    """Refuse to write cfg in a family's layout whose PyTorch model cannot hold all of it (a file that would load
    into neither library), in one line naming the families it does export to; `model_family` is the family the
    model came from, for the message."""
    if family not in FAMILIES:
        raise CheckpointError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    foreign = foreign_parts(cfg, family)
    if foreign:
        origin = f" (family {model_family})" if model_family else ""
        fits = export_families(cfg)
        exports = f"it exports as {', '.join(fits)} (--family {fits[0]})" if fits else "no family's layout holds it"
        raise CheckpointError(
            f"model {cfg.name}{origin} cannot be written in the {family} layout: it has {', '.join(foreign)}, which "
            f"{family}'s PyTorch model cannot hold; {exports}"
        )


def _check_unit_family(cfg: ModelConfig, family: str) -> None:
    """UVC slim models (per-layer heads, value widths, absent branches) have a PyTorch model only in timm's layout."""
    if family != "timm":
        raise CheckpointError(
            f"config {cfg.name!r} has per-layer attention units (layer_heads / value_dims / absent branches), which "
            f"only family='timm' converts (a timm VisionTransformer with per-layer Attention and Mlp); got {family!r}"
        )


def _from_padded(
    src: str | os.PathLike | Mapping[str, Any], family: str, cfg: ModelConfig, strict: bool, img_size: int | None
) -> tuple[ModelConfig, Params]:
    """Import the padded PyTorch form of a UVC slim config (what to_torch writes) and slice it back to cfg; the
    padding (zero value columns, all-zero stand-in branches) must be exactly zero, else CheckpointError."""
    padded, plan = padded_config(cfg)
    padded_cfg, padded_params = from_torch(src, family, padded.replace(scan_layers=False), strict=strict)
    slim_cfg, params, _ = slice_units(padded_cfg, padded_params, plan)
    if strict:
        again = flatten(pad_units(slim_cfg, params)[1])
        loaded = flatten(padded_params)
        nonzero = sorted(k for k, v in loaded.items() if not np.array_equal(again[k], v))
        if nonzero:
            raise CheckpointError(
                f"checkpoint does not match the slim config {cfg.name!r}: the padding of narrowed heads or removed "
                "branches is not zero (was the model trained after export?); import it with "
                "arch=dgmr_jax.models.slim.padded_config(cfg)[0] to keep those weights:\n"
                + listing("params with nonzero padding", nonzero)
            )
    if img_size is not None:
        slim_cfg, params = set_image_size(slim_cfg, params, img_size)
    slim_cfg = slim_cfg.replace(scan_layers=cfg.scan_layers)
    return slim_cfg, stack_blocks(params) if slim_cfg.scan_layers else params
