"""`dgmr-jax export --format torch`: a self-contained PyTorch package (model.safetensors, config.json, modeling.py)
for unpruned, DGMR-pruned and UVC slim models of three families. Its forward matches ours (and timm's / open_clip's
for the unpruned models), and FlopCounterMode counts exactly count_flops per image, so the FLOPs ratio the pruning
reached is the ratio the PyTorch model runs at. The timm state-dict export says what its padding costs."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from reference import (
    config_only_model,
    images,
    package_modeling,
    rel_err,
    small_clip,
    small_timm,
    state_dict_numpy,
    timm_outputs,
    to_nhwc,
    torch,
)
from reference_uvc import mixed_plan, timm_slim
from torch.utils.flop_counter import FlopCounterMode

import dgmr_jax as dj
from dgmr_jax.cli import main
from dgmr_jax.io import torch_export
from dgmr_jax.io.model_dir import save_model
from dgmr_jax.io.source import InMemorySource
from dgmr_jax.models import config as config_lib
from dgmr_jax.models import slim
from dgmr_jax.models.cost import count_flops, count_params
from dgmr_jax.models.tree import flatten, stack_blocks, unflatten
from dgmr_jax.models.vit import init_params

TOL = 1e-5
FILES = ["config.json", "model.safetensors", "modeling.py"]


def _converted(family: str):
    """(cfg, params, pooled features of outside code on x, x) of a 5-layer model converted from timm / open_clip."""
    if family == "open_clip":
        model, cfg, _ = small_clip(depth=5)
        cfg, params = dj.convert.from_torch(state_dict_numpy(model), family="open_clip", arch=cfg)
        x = images(cfg.img_size)
        with torch.no_grad():
            return cfg, params, model.encode_image(x), x
    model, cfg, img = small_timm(family, depth=5)
    cfg, params = dj.convert.from_torch(state_dict_numpy(model), arch=cfg)
    x = images(img)
    return cfg, params, timm_outputs(model, x)["pooled"], x


def _variants(cfg, params) -> dict:
    """The unpruned model, a DGMR student (per-layer MLP widths) and a UVC student with every kind of unit."""
    hidden = cfg.mlp_hidden[0]
    widths = [hidden // k for k in (2, 3, 4, 2, 5)]
    dgmr = dj.prune.prune_mlp(cfg, params, method="diversity", hidden=widths)
    uvc = slim.slice_units(cfg, params, mixed_plan(cfg))[:2]
    assert dgmr[0].mlp_hidden == tuple(widths)
    assert uvc[0].depth == 4 and 0 in uvc[0].layer_heads and 0 in uvc[0].mlp_hidden and len(set(uvc[0].vdims(2))) > 1
    return {"unpruned": (cfg, params), "DGMR": dgmr, "UVC": uvc}


def _flops(model, x: torch.Tensor) -> int:
    """FlopCounterMode's count of one forward, per image. timm's attention runs unfused here: FlopCounterMode does
    not count the fused CPU kernel that F.scaled_dot_product_attention dispatches to."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    total = counter.get_total_flops()
    assert total % x.shape[0] == 0
    return total // x.shape[0]


def _parity(model, cfg, params, x: torch.Tensor) -> float:
    """Largest relative difference of the package's outputs from ours."""
    with torch.no_grad():
        got = model.outputs(x)
    want = dj.models.forward(cfg, params, to_nhwc(x))
    assert set(got) == set(want)
    return max(rel_err(got[k].numpy(), np.asarray(want[k])) for k in want)


@pytest.mark.parametrize("family", ["vit_tiny_patch16_224", "open_clip", "eva02_base_patch14_224"])
@pytest.mark.slow
def test_package_keeps_the_function_and_the_flops(family, tmp_path):
    """Per model: forward parity with ours to 1e-5, FlopCounterMode == count_flops per image, params ==
    count_params; so the PyTorch FLOPs ratio to the unpruned export is count_flops' ratio. A UVC student also at a
    second resolution (resampled positions, RoPE grid). The unpruned export also matches timm / open_clip."""
    cfg, params, outside, x = _converted(family)
    flops = {}
    for variant, (vcfg, vparams) in _variants(cfg, params).items():
        out = tmp_path / variant
        torch_export.export_package(InMemorySource(vcfg, vparams), out)
        assert sorted(p.name for p in out.iterdir()) == FILES
        model = package_modeling(out).load(out)
        parity = _parity(model, vcfg, vparams, x)
        flops[variant] = _flops(model, x)
        ratio, want = flops[variant] / flops["unpruned"], count_flops(vcfg) / count_flops(cfg)
        print(f"{family} {variant}: parity {parity:.1e}, torch FLOPs ratio {ratio:.4f}, count_flops ratio {want:.4f}")
        assert parity <= TOL
        assert flops[variant] == count_flops(vcfg) and ratio == want
        assert sum(p.numel() for p in model.parameters()) == count_params(vcfg)
        if variant == "unpruned":
            with torch.no_grad():
                assert rel_err(model(x).numpy(), outside) <= TOL
        if variant == "UVC":
            bigger = images(vcfg.img_size + vcfg.patch_size)
            assert _parity(model, vcfg, vparams, bigger) <= TOL
            assert _flops(model, bigger) == count_flops(vcfg, img_size=vcfg.img_size + vcfg.patch_size)
    assert flops["UVC"] < flops["unpruned"] and flops["DGMR"] < flops["unpruned"]


# the features the three families above leave out, on random weights (every param seeded noise, no unit scales)
OTHER_FEATURES = {
    "distilled": dict(
        name="deit_small_distilled_patch16_224",
        **dict(depth=5, img_size=32, width=64, num_heads=4, head_dim=24, hidden=96, num_classes=10, head_bias=False),
        **dict(reg_tokens=2, pos_embed_prefix=2, mask_token=True, patch_bias=False, pre_norm=True, fc_norm=True),
        **dict(layer_scale=True, post_norm=True, norm="rmsnorm", qk_norm="full", attn_norm=True, qkv_bias="none"),
        **dict(mlp_type="quick_gelu", mlp_norm=True, proj_dim=16, rope=True, rope_ref_grid=3),
        **dict(pos_resample_antialias=False, pos_resample_offset=0.1),
    ),
    "no class token": dict(
        name="vit_tiny_patch16_224",
        **dict(depth=2, img_size=32, width=64, num_heads=2, hidden=128, num_classes=0, final_norm=False),
        **dict(class_token=False, reg_tokens=1, pos_embed_prefix=0, global_pool="avg", qkv_bias="qv"),
    ),
}


@pytest.mark.parametrize("kind", sorted(OTHER_FEATURES))
@pytest.mark.slow
def test_package_covers_the_other_features(kind, tmp_path):
    """Distillation token, registers, mask token, head_dim, layer scale, post-norm, RMSNorm, q/k norm, attention-
    output and hidden norms, bias-free qkv, quick GELU, projection, RoPE at a reference grid, positions resampled
    without antialiasing by DINOv2's offset scale factor; no class token with average pooling and q/v bias.
    Unpruned and (5 layers) UVC slim, at the model's resolution and one patch larger: parity to 1e-5,
    FlopCounterMode == count_flops. A scanned stack exports the same tensors."""
    fields = dict(OTHER_FEATURES[kind])
    cfg = dj.models.preset(fields.pop("name"), **fields)
    rng = np.random.default_rng(0)
    noisy = {k: (0.1 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in flatten(init_params(cfg)).items()}
    models = {"unpruned": (cfg, unflatten(noisy))}
    per_layer, scanned = (torch_export.torch_state(p) for p in (models["unpruned"][1], stack_blocks(unflatten(noisy))))
    assert scanned.keys() == per_layer.keys() and all(np.array_equal(scanned[k], v) for k, v in per_layer.items())
    if cfg.depth == 5:
        models["UVC"] = slim.slice_units(cfg, models["unpruned"][1], mixed_plan(cfg))[:2]
    for variant, (vcfg, vparams) in models.items():
        torch_export.export_package(InMemorySource(vcfg, vparams), tmp_path / variant)
        model = package_modeling(tmp_path / variant).load(tmp_path / variant)
        for size in (vcfg.img_size, vcfg.img_size + vcfg.patch_size):
            x = images(size)
            assert _parity(model, vcfg, vparams, x) <= TOL, (variant, size)
            assert _flops(model, x) == count_flops(vcfg, img_size=size), (variant, size)
        assert sum(p.numel() for p in model.parameters()) == count_params(vcfg)


def test_modeling_covers_every_config_field():
    """modeling.py decides about every ModelConfig field (a new field fails here until it does), and its allowed
    values are the config's own."""
    implements, ignores = torch_export.template_tables()
    fields = {f.name for f in dataclasses.fields(dj.models.ModelConfig)}
    assert set(implements) | set(ignores) == fields and not set(implements) & set(ignores)
    assert implements["mlp_type"] == config_lib.MLP_TYPES and implements["qkv_bias"] == config_lib.QKV_BIAS
    assert implements["norm"] == config_lib.NORMS and implements["qk_norm"] == config_lib.QK_NORMS
    assert implements["global_pool"] == config_lib.POOLS


def _uvc_dir(root: Path):
    """A UVC student of the small timm ViT-Ti as a model directory (meta: family, searched ratio); (teacher timm
    model, slim cfg, slim params, directory)."""
    teacher, cfg, _ = small_timm("vit_tiny_patch16_224", depth=5)
    cfg, params = dj.convert.from_torch(state_dict_numpy(teacher), arch=cfg)
    slim_cfg, slim_params, _ = slim.slice_units(cfg, params, mixed_plan(cfg))
    ratio = count_flops(slim_cfg) / count_flops(cfg)
    save_model(root / "uvc", slim_cfg, slim_params, family="timm", uvc={"ratio": ratio})
    return teacher, slim_cfg, slim_params, root / "uvc"


# run in a fresh interpreter that cannot import dgmr_jax, jax or safetensors: only torch and OUT/modeling.py
_USER = """
import sys
for name in ("dgmr_jax", "jax", "flax", "safetensors"):
    sys.modules[name] = None
import torch
sys.path.insert(0, sys.argv[1])
import modeling
model = modeling.load(sys.argv[1])
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[2])), sys.argv[3])
print(type(model).__name__)
"""


@pytest.mark.slow
def test_cli_exports_a_package_that_runs_with_torch_alone(tmp_path):
    """`dgmr-jax export --format torch` in a subprocess, then a fresh python that imports only torch and the
    package's modeling.py: it loads the UVC student and computes its pooled features (ours to 1e-5)."""
    _, slim_cfg, slim_params, model_dir = _uvc_dir(tmp_path)
    out = tmp_path / "pkg"
    cli = [sys.executable, "-m", "dgmr_jax.cli", "export", "--model", str(model_dir), "--format", "torch"]
    run = subprocess.run([*cli, "--out", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    tensors = len(torch_export.torch_state(slim_params))
    assert run.stdout.splitlines()[-1] == (
        f"wrote {out}: model.safetensors ({tensors} tensors, {count_params(slim_cfg) / 1e6:.2f} M params), "
        f"config.json, modeling.py; {count_flops(slim_cfg) / 1e9:.3f} GFLOPs per 32 px image; load it with "
        f"`modeling.load({str(out)!r})` (needs only torch)"
    )
    assert sorted(p.name for p in out.iterdir()) == FILES
    spec = json.loads((out / "config.json").read_text())
    assert spec["config"]["layer_heads"] == list(slim_cfg.layer_heads) and spec["meta"]["family"] == "timm"

    x = images(32)
    torch.save(x, tmp_path / "x.pt")
    user = [sys.executable, "-I", "-c", _USER, str(out), str(tmp_path / "x.pt"), str(tmp_path / "pooled.pt")]
    run = subprocess.run(user, capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "VisionTransformer"
    want = dj.models.forward(slim_cfg, slim_params, to_nhwc(x))["pooled"]
    assert rel_err(torch.load(tmp_path / "pooled.pt").numpy(), want) <= TOL


@pytest.mark.slow
def test_timm_export_says_what_padding_costs(tmp_path, capsys):
    """The timm state dict of a UVC student pads it; the export's second line gives the cost, which FlopCounterMode
    confirms on three PyTorch models: the teacher (timm), the padded student (timm) and the slim package."""
    teacher, slim_cfg, _, model_dir = _uvc_dir(tmp_path)
    assert main(["export", "--model", str(model_dir), "--out", str(tmp_path / "padded.safetensors")]) == 0
    assert main(["export", "--model", str(model_dir), "--format", "torch", "--out", str(tmp_path / "pkg")]) == 0
    note = capsys.readouterr().out.splitlines()[1]

    x = images(32)
    padded = timm_slim("vit_tiny_patch16_224", slim_cfg)
    sd = dj.convert.load_state_dict(str(tmp_path / "padded.safetensors"))
    padded.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
    package = package_modeling(tmp_path / "pkg").load(tmp_path / "pkg")
    original, padded_flops, slim_flops = _flops(teacher, x), _flops(padded, x), _flops(package, x)
    padded_params = sum(p.numel() for p in padded.parameters())
    assert note == (
        "padding: timm's layout needs one value width per head and both branches in every block, so this file "
        f"costs {padded_flops / slim_flops:.3f}x the slim model's FLOPs ({padded_flops / original:.3f} of the "
        f"original's FLOPs against {slim_flops / original:.3f} searched) and has {padded_params / 1e6:.2f} M params "
        f"against {count_params(slim_cfg) / 1e6:.2f} M; `--format torch` keeps the slim shapes"
    )
    assert padded_flops > slim_flops
    # a slim model that no search recorded: the cost against itself only; an unpadded model: no note
    assert torch_export.padding_note(slim_cfg, {}).startswith(
        f"padding: timm's layout needs one value width per head and both branches in every block, so this file "
        f"costs {padded_flops / slim_flops:.3f}x the slim model's FLOPs and has "
    )
    assert torch_export.padding_note(dj.models.preset("vit_tiny_patch16_224", layer_heads=(2,) * 12), {}) == ""


def _config_only_dir(root: Path) -> Path:
    """A model directory with its config.json alone (a tiny EVA02: SwiGLU, RoPE): the refusals come before any
    weight is read."""
    cfg = dj.models.preset("eva02_small_patch14_224", depth=1, img_size=28, width=32, num_heads=2, hidden=64)
    config_only_model(root / "model", cfg)
    return root / "model"


def test_export_refusals_are_one_line_and_write_nothing(tmp_path, capsys, monkeypatch):
    """--family / --prefix with --format torch, an existing --out, and a config feature that modeling.py does not
    implement: exit 2, one line, nothing written (and no weight read)."""
    model = str(_config_only_dir(tmp_path))
    base = ["export", "--model", model, "--format", "torch", "--out"]
    assert main([*base, str(tmp_path / "a"), "--family", "timm"]) == 2
    assert capsys.readouterr().err == (
        "dgmr-jax export: error: --family and --prefix lay out a state dict; --format torch writes its own package: "
        "drop them\n"
    )
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert main([*base, str(tmp_path / "full")]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]

    implements, ignores = torch_export.template_tables()
    fewer = {k: v for k, v in implements.items() if k != "rope"} | {"mlp_type": ("gelu",)}
    monkeypatch.setattr(torch_export, "template_tables", lambda: (fewer, ignores))
    assert main([*base, str(tmp_path / "b")]) == 2
    assert capsys.readouterr().err == (
        "dgmr-jax export: error: config 'eva02_small_patch14_224' has features that the PyTorch modeling.py does not "
        "implement: mlp_type='swiglu' (it handles 'gelu'); rope=True; export a state dict instead "
        "(--format state-dict)\n"
    )
    assert not (tmp_path / "b").exists() and not (tmp_path / ".b.partial").exists()
