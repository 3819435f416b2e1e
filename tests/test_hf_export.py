"""`dgmr-jax export --format transformers`: a model directory as the folder transformers' save_pretrained writes
(config.json, model.safetensors or shards with model.safetensors.index.json). Hugging Face directories (sharded
safetensors and .bin) go through convert -> prune (DGMR, one width) -> export in a subprocess, and
transformers' from_pretrained loads the result with nothing missing, unexpected or mis-shaped, computing what our
forward computes (<= 1e-5, pooled and tokens); timm and open_clip models export to the class that holds them; full
size presets build the transformers class (on the meta device) with our names and shapes; what no class holds is
refused in one line naming --format torch, before any weight is read and with nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from reference import (
    config_only_model,
    images,
    meta_state_dict,
    small_clip,
    small_timm,
    state_dict_numpy,
    to_nhwc,
)
from test_hf_dirs import MODELS, SHARD, TOL, reference_outputs, saved

import dgmr_jax as dj
from dgmr_jax.cli import main
from dgmr_jax.core.errors import UserError
from dgmr_jax.io.checkpoint_io import load_state_dict
from dgmr_jax.io.hf_config import hf_preprocess
from dgmr_jax.io.hf_export import shard_bytes, shards, transformers_plan
from dgmr_jax.io.model_dir import save_model
from dgmr_jax.io.open import open_model
from dgmr_jax.model_dir import load_model
from dgmr_jax.models.preprocess import Preprocess
from dgmr_jax.models.tree import flatten

transformers = pytest.importorskip("transformers")

# the class each Hugging Face directory of test_hf_dirs exports as (a CLIPModel's vision tower and projection:
# CLIPVisionModelWithProjection), and the MLP width its DGMR student keeps (SwiGLU: widths that an integer
# mlp_ratio gives are multiples of 8 in steps of 2/3 of the width: 64 = 2/3 * 3 * 32)
EXPORTED = {label: (cls, 32) for label, (cls, _, _) in MODELS.items()}
EXPORTED |= {"CLIPModel": ("CLIPVisionModelWithProjection", 32), "Dinov2Model-swiglu": ("Dinov2Model", 64)}


def _cli(*argv: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dgmr_jax.cli", *map(str, argv)], capture_output=True, text=True)


def load_exported(folder: Path):
    """The folder loaded as a user loads it: AutoModel, or the class in architectures[0] where AutoModel maps to
    another (transformers' AutoModel gives a clip_vision_model config CLIPVisionModel, which leaves the projection
    out); nothing missing, unexpected or mis-shaped."""
    name = json.loads((folder / "config.json").read_text())["architectures"][0]
    model, info = transformers.AutoModel.from_pretrained(folder, output_loading_info=True)
    if type(model).__name__ != name:
        assert name == "CLIPVisionModelWithProjection" and info["unexpected_keys"] == {"visual_projection.weight"}
        model, info = getattr(transformers, name).from_pretrained(folder, output_loading_info=True)
    assert type(model).__name__ == name
    assert {k: v for k, v in info.items() if v} == {}, info
    return model.eval()


def assert_parity(label: str, cfg, params, model) -> None:
    """Our forward against the loaded transformers model, at the model's image size (tokens and pooled)."""
    x = images(cfg.img_size)
    ours = dj.models.forward(cfg, params, to_nhwc(x))
    for key, ref in reference_outputs(model, x).items():
        err = float(np.abs(np.asarray(ours[key], np.float64) - ref.numpy()).max())
        print(f"PARITY export {label:40s} {key:7s} max_abs={err:.2e}")
        assert err <= TOL, (label, key, err)


def assert_sharded(folder: Path, limit: int) -> int:
    """The index names exactly the shard files, which hold exactly its entries, each shard within `limit` bytes of
    tensors unless it holds one tensor; returns the number of shards."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    configs = {"config.json", "preprocessor_config.json", "model.safetensors.index.json"}
    assert {p.name for p in folder.iterdir()} == files | configs
    total = 0
    for name in files:
        part = load_state_dict(folder / name)
        assert set(part) == {k for k, v in index["weight_map"].items() if v == name}
        size = sum(v.nbytes for v in part.values())
        assert size <= limit or len(part) == 1, (name, size)
        total += size
    assert index["metadata"]["total_size"] == total
    return len(files)


@pytest.mark.slow
@pytest.mark.parametrize(
    "label, fmt",
    # SwiGLU, registers, a plain and a projecting CLIP tower, both file formats (the readers are tested on all
    # of MODELS in test_hf_dirs)
    [
        ("Dinov2Model-swiglu", "safetensors"),
        ("Dinov2WithRegistersModel", "bin"),
        ("CLIPVisionModel", "safetensors"),
        ("CLIPModel", "bin"),
    ],
)
def test_hf_directory_converts_prunes_and_exports_back_to_transformers(label, fmt, tmp_path):
    """A user's convert (no --family/--arch) -> prune -> export --format transformers of a sharded save_pretrained
    directory: transformers loads the export strictly and computes what the pruned model computes."""
    _, folder = saved(label, tmp_path, fmt)
    processor = dict(image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.4], size={"shortest_edge": 28}, resample=3)
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    model, pruned, out = tmp_path / "model", tmp_path / "pruned", tmp_path / "hf"
    cls, hidden = EXPORTED[label]
    run = _cli("convert", "--checkpoint", folder, "--out", model)
    assert run.returncode == 0, run.stderr[-2000:]
    run = _cli("prune", "--model", model, "--method", "diversity", "--hidden", hidden, "--out", pruned)
    assert run.returncode == 0, run.stderr[-2000:]
    cfg, params = load_model(pruned)
    assert cfg.mlp_hidden == (hidden, hidden)
    run = _cli("export", "--model", pruned, "--format", "transformers", "--max-shard-size", SHARD, "--out", out)
    assert run.returncode == 0, run.stderr[-2000:]
    count = assert_sharded(out, shard_bytes(SHARD))
    hf = load_exported(out)
    tensors = len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"])
    processor = "BitImageProcessor" if cls.startswith("Dinov2") else "CLIPImageProcessor"
    assert count >= 3 and run.stdout == (
        f"wrote {out}: config.json ({cls}), preprocessor_config.json ({processor}), {count} shards and "
        f"model.safetensors.index.json ({tensors} tensors, {sum(v.numel() for v in hf.parameters()) / 1e6:.2f} M "
        f"params); load it with transformers.{cls}.from_pretrained({str(out)!r})\n"
    )
    assert_parity(f"{label} ({fmt}, pruned to {hidden})", cfg, params, hf)
    # read back, the export is the pruned model with its preprocessing; transformers' image processor takes it
    again = open_model(out)
    assert again.cfg == cfg.replace(name="hf") and hf_preprocess(str(out)) == Preprocess.from_meta(again.meta)
    assert Preprocess.from_meta(again.meta) == Preprocess((0.4, 0.5, 0.6), (0.2, 0.3, 0.4))
    pixels = transformers.AutoImageProcessor.from_pretrained(out)(np.zeros((40, 30, 3), np.uint8))["pixel_values"]
    assert np.asarray(pixels).shape == (1, 3, 28, 28)


def _timm_dir(root: Path, name: str, num_classes: int | None = None):
    """A small timm model converted to a model directory (family timm): (cfg, params, directory)."""
    model, cfg, _ = small_timm(name, num_classes=num_classes)
    cfg, params = dj.convert.from_torch(state_dict_numpy(model), arch=cfg)
    save_model(root / name, cfg, params, family="timm")
    return cfg, params, root / name


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, num_classes, cls",
    [
        ("vit_small_patch14_dinov2", None, "Dinov2Model"),
        ("vit_small_patch14_reg4_dinov2", None, "Dinov2WithRegistersModel"),  # positions on the patches alone
        ("vit_giant_patch14_dinov2", None, "Dinov2Model"),  # packed SwiGLU
        ("vit_base_patch16_clip_224", 0, "CLIPVisionModel"),  # timm's CLIP tower without a head
    ],
)
def test_timm_models_export_to_the_class_that_holds_them(name, num_classes, cls, tmp_path, capsys):
    cfg, params, model_dir = _timm_dir(tmp_path, name, num_classes)
    out = tmp_path / "hf"
    assert main(["export", "--model", str(model_dir), "--format", "transformers", "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out}: config.json ({cls}), model.safetensors (")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert_parity(name, cfg, params, load_exported(out))


def test_an_open_clip_tower_exports_with_its_projection(tmp_path, capsys):
    model, cfg, _ = small_clip()
    cfg, params = dj.convert.from_torch(state_dict_numpy(model), family="open_clip", arch=cfg)
    save_model(tmp_path / "clip", cfg, params, family="open_clip")
    out = tmp_path / "hf"
    assert main(["export", "--model", str(tmp_path / "clip"), "--format", "transformers", "--out", str(out)]) == 0
    assert "config.json (CLIPVisionModelWithProjection), model.safetensors" in capsys.readouterr().out
    assert_parity("open_clip ViT-B-32 (small)", cfg, params, load_exported(out))


# full-size presets as converted from their family -> the class they export as
PRESETS = {
    ("vit_small_patch14_dinov2", "timm"): "Dinov2Model",
    ("vit_small_patch14_reg4_dinov2", "timm"): "Dinov2WithRegistersModel",
    ("vit_giant_patch14_dinov2", "dinov2"): "Dinov2Model",
    ("vit_large_patch14_dinov2", "hf_dinov2"): "Dinov2Model",
    ("ViT-L-14", "open_clip"): "CLIPVisionModelWithProjection",
    ("ViT-bigG-14", "open_clip"): "CLIPVisionModelWithProjection",
}


@pytest.mark.parametrize("name, family", sorted(PRESETS))
def test_full_size_presets_build_the_class_at_our_size(name, family):
    """transformers' strict config takes the config.json written, and its class (built on the meta device: no
    memory) has exactly the model's parameter count, the zero tokens the export adds included. (Names are checked
    by the strict loads above: transformers 5 renames DINOv2's modules, q_proj for the saved query, on load.)"""
    cfg = dj.convert.resolve_config(name, family)
    _, back, config = transformers_plan(cfg, family)
    cls = config["architectures"][0]
    assert cls == PRESETS[name, family] and back.mlp_hidden == cfg.mlp_hidden and back.width == cfg.width
    fields = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    hf_config = transformers.AutoConfig.for_model(config["model_type"], **fields)
    _, count = meta_state_dict(lambda: getattr(transformers, cls)(hf_config))
    assert count == sum(int(np.prod(v.shape)) for v in flatten(dj.models.param_shapes(back)).values())


def test_shards_split_as_save_pretrained_splits():
    """In order; a shard closes before a tensor that would take it past the limit; a larger tensor is alone."""
    sd = {f"t{i}": np.zeros(n, np.uint8) for i, n in enumerate([6, 6, 2, 6, 2, 2, 12, 1])}
    assert [list(s) for s in shards(sd, 10)] == [["t0"], ["t1", "t2"], ["t3", "t4", "t5"], ["t6"], ["t7"]]
    assert shard_bytes("20KB") == 20_000 and shard_bytes("2GiB") == 2**31 and shard_bytes("5gb") == 5 * 10**9
    assert shard_bytes("123") == 123
    with pytest.raises(UserError, match=r"^--max-shard-size must be a positive size such as 5GB, 500MB or 2GiB, got"):
        shard_bytes("5XB")


_TINY = dict(img_size=28, width=32, depth=2, num_heads=2)
# refused input: (model config, meta family, extra export flags) -> the error line
REFUSALS = {
    "UVC slim": (
        dj.models.preset("vit_small_patch14_dinov2", **_TINY, hidden=64, layer_heads=(1, 2)),
        "timm",
        [],
        "model vit_small_patch14_dinov2 is a UVC slim model (per-layer heads, value widths or removed blocks), which "
        "no transformers class holds; export it with --format torch",
    ),
    "per-layer widths": (
        dj.models.preset("vit_small_patch14_dinov2", **_TINY, mlp_hidden=(32, 16)),
        "hf_dinov2",
        [],
        "model vit_small_patch14_dinov2 has per-layer MLP widths [32, 16], but transformers' Dinov2Model, "
        "CLIPVisionModel, SiglipVisionModel give every layer one MLP width; export it with --format torch",
    ),
    "SwiGLU width": (
        dj.models.preset("vit_giant_patch14_dinov2", **_TINY, hidden=32),
        "hf_dinov2",
        [],
        "model vit_giant_patch14_dinov2 (family hf_dinov2) cannot be written as transformers' Dinov2Model: its "
        "Dinov2Config sizes the MLP as an integer mlp_ratio times the width 32 (SwiGLU: 2/3 of it, rounded up to a "
        "multiple of 8), which never gives 32; export it with --format torch",
    ),
    "MLP ratio 1.5": (
        dj.models.preset("vit_small_patch14_dinov2", **_TINY, hidden=48),
        "hf_dinov2",
        [],
        "model vit_small_patch14_dinov2 (family hf_dinov2) cannot be written as transformers' Dinov2Model: its "
        "Dinov2Config sizes the MLP as an integer mlp_ratio times the width 32, which never gives 48; export it with "
        "--format torch",
    ),
    "timm ViT with a head": (
        dj.models.preset("vit_tiny_patch16_224", **_TINY, patch_size=14, hidden=64),
        "timm",
        [],
        "model vit_tiny_patch16_224 (family timm) fits no transformers class: as Dinov2Model it has a classification "
        "head, no layer scale; as CLIPVisionModel it has a patch-embedding bias, a classification head; as "
        "SiglipVisionModel it has a class token, no attention pool, a classification head; export it with --format "
        "torch",
    ),
    "--family": (
        dj.models.preset("vit_small_patch14_dinov2", **_TINY, hidden=64),
        "timm",
        ["--family", "hf_dinov2"],
        "--family and --prefix lay out a state dict; --format transformers writes its own package: drop them",
    ),
    "--max-shard-size 5XB": (
        dj.models.preset("vit_small_patch14_dinov2", **_TINY, hidden=64),
        "timm",
        ["--max-shard-size", "5XB"],
        "--max-shard-size must be a positive size such as 5GB, 500MB or 2GiB, got '5XB'",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_what_no_transformers_class_holds_is_one_line_and_writes_nothing(case, tmp_path, capsys):
    """Exit 2 and one line, from the config alone (the model directory holds no weights), nothing written."""
    cfg, family, flags, message = REFUSALS[case]
    config_only_model(tmp_path / "model", cfg, family=family)
    out = tmp_path / "hf"
    code = main(["export", "--model", str(tmp_path / "model"), "--format", "transformers", *flags, "--out", str(out)])
    assert (code, *capsys.readouterr()) == (2, "", f"dgmr-jax export: error: {message}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_max_shard_size_belongs_to_transformers_and_an_output_that_exists_is_kept(tmp_path, capsys):
    model = tmp_path / "model"
    config_only_model(model, dj.models.preset("vit_small_patch14_dinov2", **_TINY, hidden=64), family="timm")
    base = ["export", "--model", str(model)]
    assert main([*base, "--max-shard-size", "1GB", "--out", str(tmp_path / "a.safetensors")]) == 2
    assert capsys.readouterr().err == (
        "dgmr-jax export: error: --max-shard-size splits a --format transformers folder: drop it, or add that format\n"
    )
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert main([*base, "--format", "transformers", "--out", str(tmp_path / "full")]) == 2
    assert capsys.readouterr().err == (
        f"dgmr-jax export: error: {tmp_path / 'full'} already exists and is not empty; choose another output or "
        "remove it first\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "model"]
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
