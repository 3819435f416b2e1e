"""PyTorch exports that keep a model's savings.

`export_package` writes any model (uniform, DGMR-pruned, UVC slim) as a self-contained PyTorch package: a new
folder with model.safetensors (every param at its exact slim shape), config.json (the ModelConfig and the meta)
and modeling.py (a copy of dgmr_jax/io/torch_modeling.py, which needs only torch). `padding_note` says what the
timm layout's padding of a UVC slim model costs (dgmr_jax.models.slim.pad_units).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dgmr_jax.core.errors import UserError
from dgmr_jax.core.paths import PathLike, is_uri
from dgmr_jax.io.checkpoint_io import save_safetensors
from dgmr_jax.io.model_dir import check_new_dir
from dgmr_jax.io.source import LayerSource
from dgmr_jax.models.config import ModelConfig
from dgmr_jax.models.cost import count_flops, count_params
from dgmr_jax.models.slim import needs_padding, padded_config
from dgmr_jax.models.tree import Params, flatten, is_scanned, unstack_blocks

TEMPLATE = Path(__file__).with_name("torch_modeling.py")
WEIGHTS, CONFIG, MODELING = "model.safetensors", "config.json", "modeling.py"
FORMAT = "dgmr-jax torch package"


def template_tables() -> tuple[dict[str, tuple | None], tuple[str, ...]]:
    """(IMPLEMENTS, IGNORES) of the modeling.py template, read from its text (so exporting needs no torch): the
    config fields it implements with their allowed values, and the fields it ignores."""
    tables = {}
    for node in ast.parse(TEMPLATE.read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in ("IMPLEMENTS", "IGNORES"):
                tables[node.targets[0].id] = ast.literal_eval(node.value)
    return tables["IMPLEMENTS"], tables["IGNORES"]


def check_implemented(cfg: ModelConfig) -> None:
    """Refuse, in one line, a config whose features modeling.py does not implement (a field it does not know set
    away from its default, or a value outside the ones it handles), rather than export a different model."""
    implements, ignores = template_tables()
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    problems = []
    for field, value in dataclasses.asdict(cfg).items():
        if field in ignores:
            continue
        allowed = implements.get(field)
        if field not in implements and value != defaults[field]:
            problems.append(f"{field}={value!r}")
        elif allowed is not None and value not in allowed:
            problems.append(f"{field}={value!r} (it handles {', '.join(map(repr, allowed))})")
    if problems:
        raise UserError(
            f"config {cfg.name!r} has features that the PyTorch modeling.py does not implement: {'; '.join(problems)}; "
            "export a state dict instead (--format state-dict)"
        )


def torch_state(params: Params) -> dict[str, np.ndarray]:
    """The param tree in modeling.py's names and layouts: blocks_i -> blocks.i, Dense kernels (in, out) -> Linear
    weights (out, in), the patch kernel (p, p, 3, D) -> a Conv2d weight (D, 3, p, p), norm scales -> weight."""
    state = {}
    for path, value in flatten(unstack_blocks(params) if is_scanned(params) else params).items():
        *parents, leaf = path.split("/")
        value = np.asarray(value)
        if leaf == "kernel":
            leaf, value = "weight", value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        elif leaf == "scale" and parents[-1] not in ("ls1", "ls2"):
            leaf = "weight"
        if parents and parents[0].startswith("blocks_"):
            parents[0] = "blocks." + parents[0][len("blocks_") :]
        state[".".join([*parents, leaf])] = np.ascontiguousarray(value)
    return state


def check_new_folder(out: PathLike, fmt: str) -> None:
    """Refuse, before anything is read, an `--out` that is not a new (or empty) local folder."""
    if is_uri(out):
        raise UserError(f"--format {fmt} writes a local folder, got {out}; export locally, then copy the folder")
    check_new_dir(out)


def write_folder(out: PathLike, fill: Callable[[Path], None]) -> Path:
    """Let `fill` write the new folder `out`'s files into a temporary sibling, renamed into place at the end (so an
    interrupted export leaves nothing under the name); returns the folder."""
    path = Path(out)
    tmp = path.with_name(f".{path.name}.partial")
    if tmp.exists():  # left by an interrupted export
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    fill(tmp)
    if path.exists():
        path.rmdir()  # empty (check_new_folder)
    os.replace(tmp, path)
    return path


def export_package(source: LayerSource, out: PathLike) -> str:
    """Write `source` as a PyTorch package in the new local folder `out`; returns one line saying what was
    written."""
    check_new_folder(out, "torch")
    check_implemented(source.cfg)
    state = torch_state(source.load())

    def fill(tmp: Path) -> None:
        save_safetensors(tmp / WEIGHTS, state)
        spec = {"format": FORMAT, "config": json.loads(source.cfg.to_json()), "meta": dict(source.meta)}
        (tmp / CONFIG).write_text(json.dumps(spec, indent=2))
        shutil.copyfile(TEMPLATE, tmp / MODELING)

    path = write_folder(out, fill)
    params = sum(int(v.size) for v in state.values())
    return (
        f"wrote {path}: {WEIGHTS} ({len(state)} tensors, {params / 1e6:.2f} M params), {CONFIG}, {MODELING}; "
        f"{count_flops(source.cfg) / 1e9:.3f} GFLOPs per {source.cfg.img_size} px image; load it with "
        f"`modeling.load({str(path)!r})` (needs only torch)"
    )


def padding_note(cfg: ModelConfig, meta: Mapping[str, Any]) -> str:
    """One line saying what the timm layout's padding costs against the slim model (UVC's searched ratio too, when
    meta records it); "" when cfg needs no padding."""
    if not needs_padding(cfg):
        return ""
    padded, _ = padded_config(cfg)
    flops, padded_flops = count_flops(cfg), count_flops(padded)
    ratio = (meta.get("uvc") or {}).get("ratio")
    searched = (
        f" ({ratio * padded_flops / flops:.3f} of the original's FLOPs against {ratio:.3f} searched)" if ratio else ""
    )
    return (
        "padding: timm's layout needs one value width per head and both branches in every block, so this file "
        f"costs {padded_flops / flops:.3f}x the slim model's FLOPs{searched} and has "
        f"{count_params(padded) / 1e6:.2f} M params against {count_params(cfg) / 1e6:.2f} M; "
        "`--format torch` keeps the slim shapes"
    )
