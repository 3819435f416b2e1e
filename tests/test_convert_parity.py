"""Reference parity: Flax outputs equal timm / open_clip outputs; checkpoints round-trip exactly."""

from __future__ import annotations

import numpy as np
import pytest
from reference import (
    TIMM_SMALL,
    images,
    randomize,
    rel_err,
    small_timm,
    state_dict_numpy,
    timm,
    timm_outputs,
    to_nhwc,
    torch,
)

import dgmr_jax as dj

TOL = 1e-5


def _assert_parity(cfg, params, ref: dict, x) -> None:
    out = dj.models.forward(cfg, params, to_nhwc(x))
    assert set(out) == set(ref)
    for key, value in ref.items():
        assert rel_err(out[key], value) <= TOL, (key, rel_err(out[key], value))


def _assert_round_trip(sd: dict[str, np.ndarray], cfg, params, family: str) -> None:
    back = dj.convert.to_torch(cfg, params, family)
    assert sorted(back) == sorted(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and np.array_equal(back[k], v), k


@pytest.mark.parametrize("name", sorted(TIMM_SMALL))
@pytest.mark.slow
def test_timm_parity_and_round_trip(name):
    model, cfg, img = small_timm(name)
    sd = state_dict_numpy(model)
    cfg, params = dj.convert.from_torch(model.state_dict(), family="timm", arch=cfg)
    x = images(img)
    _assert_parity(cfg, params, timm_outputs(model, x), x)
    _assert_round_trip(sd, cfg, params, "timm")


def _open_clip_visual(arch: str, img: int, width: int | None = None):
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import _build_vision_tower

    vcfg = dict(open_clip.get_model_config(arch)["vision_cfg"], layers=2, image_size=img)
    if width:
        vcfg["width"] = width
    head_width = vcfg.get("head_width", 64)
    visual = randomize(_build_vision_tower(32, vcfg))
    visual.output_tokens = True
    cfg = dj.models.preset(
        arch,
        depth=2,
        img_size=img,
        width=vcfg["width"],
        num_heads=vcfg["width"] // head_width,
        hidden=visual.transformer.resblocks[0].mlp.c_fc.out_features,
        proj_dim=32,
    )
    return visual, cfg


@pytest.mark.parametrize(
    "arch,img,width", [("ViT-B-32", 64, 128), ("ViT-L-14", 28, 128), ("ViT-g-14", 28, 176), ("ViT-bigG-14", 28, 208)]
)
@pytest.mark.slow
def test_open_clip_parity_and_round_trip(arch, img, width):
    visual, cfg = _open_clip_visual(arch, img, width)
    sd = state_dict_numpy(visual)
    # a full CLIP checkpoint: the vision tower sits under "visual.", the text tower beside it
    full = {f"visual.{k}": v for k, v in sd.items()} | {"token_embedding.weight": np.zeros((4, 8), np.float32)}
    cfg, params = dj.convert.from_torch(full, family="open_clip", arch=cfg)
    x = images(img)
    with torch.no_grad():
        pooled, tokens = visual(x)
    out = dj.models.forward(cfg, params, to_nhwc(x))
    assert rel_err(out["pooled"], pooled) <= TOL
    assert rel_err(out["tokens"][:, 1:], tokens) <= TOL
    _assert_round_trip(sd, cfg, params, "open_clip")


@pytest.mark.parametrize(
    "name", ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2", "vit_giant_patch14_dinov2"]
)
def test_dinov2_original_layout_matches_timm_loader(name):
    """Keys as facebookresearch/dinov2 saves them; timm's own converter is the reference."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    model, cfg, img = small_timm(name, seed=3)
    width = cfg.width
    gen = torch.Generator().manual_seed(5)
    original = {}
    for k, v in model.state_dict().items():
        if k == "reg_token":
            k = "register_tokens"
        if cfg.gated:
            k = k.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3")
        original[k] = torch.randn(v.shape, generator=gen) * 0.1
    if cfg.reg_tokens:  # the original pos_embed also covers the class token
        original["pos_embed"] = torch.randn(1, 1 + cfg.grid**2, width, generator=gen) * 0.1
    original["mask_token"] = torch.randn(1, width, generator=gen)
    model.load_state_dict(checkpoint_filter_fn(dict(original), model))
    x = images(img)
    ours_cfg, params = dj.convert.from_torch(original, family="dinov2", arch=cfg)
    _assert_parity(ours_cfg, params, timm_outputs(model, x), x)
    _assert_round_trip({k: v.numpy() for k, v in original.items()}, ours_cfg, params, "dinov2")


@pytest.mark.parametrize(
    "name", ["eva02_base_patch14_224", "eva_giant_patch14_clip_224", "eva02_enormous_patch14_clip_224"]
)
def test_eva_clip_original_layout_matches_timm_loader(name):
    """Keys as the EVA-CLIP repository saves them (visual.*, w1/w2/w3, ffn_ln, q_bias); timm's
    EVA converter is the reference."""
    from timm.models.eva import checkpoint_filter_fn

    model, cfg, img = small_timm(name, seed=4)
    renames = [
        ("mlp.fc1_g", "mlp.w1"),
        ("mlp.fc1_x", "mlp.w2"),
        ("mlp.norm", "mlp.ffn_ln"),
        ("attn.norm", "attn.inner_attn_ln"),
        ("q_proj.bias", "q_bias"),
        ("v_proj.bias", "v_bias"),
    ]
    gen = torch.Generator().manual_seed(6)
    original = {}
    for k, v in model.state_dict().items():
        for old, new in renames:
            k = k.replace(old, new)
        if cfg.gated and not cfg.mlp_packed:
            k = k.replace("mlp.fc2", "mlp.w3")
        original["visual." + k] = torch.randn(v.shape, generator=gen) * 0.1
    original["visual.rope.freqs_cos"] = torch.zeros(1)  # derived buffer: ignored on import
    model.load_state_dict(checkpoint_filter_fn(dict(original), model))
    x = images(img)
    ours_cfg, params = dj.convert.from_torch(original, family="eva_clip", arch=cfg)
    _assert_parity(ours_cfg, params, timm_outputs(model, x), x)
    learned = {k[len("visual.") :]: v.numpy() for k, v in original.items() if "rope" not in k}
    _assert_round_trip(learned, ours_cfg, params, "eva_clip")


@pytest.mark.slow
def test_scanned_stack_and_bf16_compute_match_the_loop():
    model, cfg, img = small_timm("eva02_base_patch14_224")
    _, params = dj.convert.from_torch(model.state_dict(), family="timm", arch=cfg)
    scan_cfg, scan_params = dj.convert.from_torch(
        model.state_dict(), family="timm", arch=cfg.replace(scan_layers=True, remat=True)
    )
    assert scan_params["blocks"]["block"]["mlp"]["fc2"]["kernel"].shape[0] == cfg.depth
    x = to_nhwc(images(img))
    ref = dj.models.forward(cfg, params, x)
    out = dj.models.forward(scan_cfg, scan_params, x)
    assert rel_err(out["tokens"], ref["tokens"]) <= TOL
    bf16 = dj.models.forward(cfg.replace(dtype="bfloat16"), params, x)
    assert bf16["tokens"].dtype.name == "bfloat16"
    assert rel_err(bf16["pooled"], ref["pooled"]) < 0.05
    assert dj.convert.to_torch(scan_cfg, scan_params)["blocks.1.mlp.fc2.weight"].shape == (96, 256)


@pytest.mark.slow
def test_position_grid_resampling_matches_timm_dynamic_size():
    """A model run at a larger image resamples its position grid as timm's dynamic_img_size does."""
    model = randomize(
        timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=28, depth=2, dynamic_img_size=True)
    )
    cfg = dj.models.preset("vit_small_patch14_dinov2", img_size=28, depth=2)
    cfg, params = dj.convert.from_torch(model.state_dict(), arch=cfg)
    x = images(70)
    _assert_parity(cfg, params, timm_outputs(model, x), x)


@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize("size_in,size_out", [(16, 37), (37, 16), (7, 7), (5, 9)])
def test_resize_matrix_equals_torch_bicubic(size_in, size_out, antialias):
    from dgmr_jax.models.posemb import resample_grid

    grid = torch.randn(1, 3, size_in, size_in + 1, generator=torch.Generator().manual_seed(0))
    ref = torch.nn.functional.interpolate(
        grid, size=(size_out, size_out + 2), mode="bicubic", antialias=antialias, align_corners=False
    )
    ours = resample_grid(grid[0].permute(1, 2, 0).numpy(), (size_out, size_out + 2), antialias)
    assert rel_err(ours, ref[0].permute(1, 2, 0)) <= TOL
