"""UVC slim models to PyTorch: the timm export (per-layer heads, zero-padded value widths, all-zero stand-ins for
removed branches) loads strictly into a rebuilt timm ViT that computes the slim model's function, and imports
back to the slim params bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from reference import images, rel_err, small_timm, state_dict_numpy, timm_outputs, to_nhwc, torch
from reference_uvc import mixed_plan, timm_slim

import dgmr_jax as dj
from dgmr_jax.convert import CheckpointError
from dgmr_jax.models import slim
from dgmr_jax.models.tree import flatten

TOL = 1e-5


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_small_patch14_dinov2"])
@pytest.mark.slow
def test_timm_export_of_a_slim_model(name):
    model, cfg, img = small_timm(name, depth=5)
    cfg, params = dj.convert.from_torch(state_dict_numpy(model), arch=cfg)
    slim_cfg, slim_params, kept = slim.slice_units(cfg, params, mixed_plan(cfg))
    assert kept == (0, 1, 2, 4) and slim_cfg.layer_heads == (cfg.num_heads - 1, 0, cfg.num_heads, cfg.num_heads)
    assert slim.needs_padding(slim_cfg)

    sd = dj.convert.to_torch(slim_cfg, slim_params, family="timm")
    ref = timm_slim(name, slim_cfg)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    # the stand-ins of removed branches are exactly zero; the padding of narrowed values too
    assert not sd["blocks.1.attn.proj.weight"].any() and sd["blocks.1.attn.qkv.weight"].shape == (3 * 64, cfg.width)
    assert not sd["blocks.2.mlp.fc2.weight"].any() and sd["blocks.2.mlp.fc1.weight"].shape == (1, cfg.width)
    widths = slim_cfg.vdims(2)
    v_rows = sd["blocks.2.attn.qkv.weight"][2 * len(widths) * 64 :].reshape(len(widths), 64, -1)
    assert all(not v_rows[h, w:].any() and v_rows[h, :w].all() for h, w in enumerate(widths))

    x = images(img)
    want = timm_outputs(ref, x)
    out = dj.models.forward(slim_cfg, slim_params, to_nhwc(x))
    errors = {k: rel_err(out[k], v) for k, v in want.items()}
    print(name, "timm export vs slim forward", errors)
    assert max(errors.values()) <= TOL, errors

    # import back: the padded checkpoint is sliced to the slim params, bit for bit
    back_cfg, back = dj.convert.from_torch(sd, family="timm", arch=slim_cfg)
    assert back_cfg == slim_cfg
    assert flatten(back).keys() == flatten(slim_params).keys()
    for k, v in flatten(slim_params).items():
        assert flatten(back)[k].dtype == v.dtype and np.array_equal(flatten(back)[k], v), k
    # keeping the padding: the padded config imports it as is
    padded_cfg, _ = slim.padded_config(slim_cfg)
    _, padded = dj.convert.from_torch(sd, family="timm", arch=padded_cfg)
    assert padded["blocks_1"]["attn"]["qkv"]["kernel"].shape == (cfg.width, 3 * 64)

    # a nonzero weight in the padding (the torch model trained after export) is not dropped silently
    trained = dict(sd)
    trained["blocks.1.attn.proj.bias"] = np.full_like(sd["blocks.1.attn.proj.bias"], 0.5)
    with pytest.raises(CheckpointError, match=r"padding .* is not zero[\s\S]*blocks_1/attn/proj/bias"):
        dj.convert.from_torch(trained, family="timm", arch=slim_cfg)
    with pytest.raises(CheckpointError, match="only family='timm' converts"):
        dj.convert.from_torch(sd, family="open_clip", arch=slim_cfg)
    with pytest.raises(CheckpointError, match=r"it has per-layer attention units \(a UVC slim model\), .*as timm "):
        dj.convert.to_torch(slim_cfg, slim_params, family="open_clip")


def test_slim_model_without_padding_round_trips_directly():
    """Per-layer heads at full value width need no padding: the export holds exactly the slim tensors."""
    model, cfg, img = small_timm("vit_tiny_patch16_224", depth=3)
    cfg, params = dj.convert.from_torch(state_dict_numpy(model), arch=cfg)
    plan = tuple(
        slim.UnitPlan(True, heads, tuple(tuple(range(64)) for _ in heads), tuple(range(0, 768, step)))
        for heads, step in [((0, 2), 2), ((1,), 3), ((0, 1, 2), 1)]
    )
    slim_cfg, slim_params, _ = slim.slice_units(cfg, params, plan)
    assert slim_cfg.layer_heads == (2, 1, 3) and slim_cfg.value_dims == () and not slim.needs_padding(slim_cfg)
    sd = dj.convert.to_torch(slim_cfg, slim_params)
    assert sd["blocks.1.attn.qkv.weight"].shape == (3 * 64, 192)
    ref = timm_slim("vit_tiny_patch16_224", slim_cfg)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    x = images(img)
    out = dj.models.forward(slim_cfg, slim_params, to_nhwc(x))
    assert max(rel_err(out[k], v) for k, v in timm_outputs(ref, x).items()) <= TOL
    back_cfg, back = dj.convert.from_torch(sd, arch=slim_cfg)
    assert back_cfg == slim_cfg
    assert all(np.array_equal(flatten(back)[k], v) for k, v in flatten(slim_params).items())
    assert flatten(back).keys() == flatten(slim_params).keys()
