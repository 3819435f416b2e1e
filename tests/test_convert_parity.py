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


def _timm_resize(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """timm's load-time resize (resample_abs_pos_embed, antialiased bicubic by default)."""
    from timm.layers import resample_abs_pos_embed

    return resample_abs_pos_embed(pos, [grid, grid], num_prefix_tokens=1)


def _open_clip_resize(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """open_clip's load-time resize of a CLIP state dict (resize_pos_embed); its table has no batch axis."""
    from types import SimpleNamespace

    from open_clip.model import resize_pos_embed

    sd = {"visual.positional_embedding": pos[0]}
    resize_pos_embed(sd, SimpleNamespace(visual=SimpleNamespace(grid_size=(grid, grid))))
    return sd["visual.positional_embedding"][None]


def _eva_clip_resize(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """EVA-CLIP's resize_eva_pos_embed (its package is not installed), from its formula: prefix rows kept, the
    grid resized by F.interpolate bicubic with align_corners=False and no antialiasing."""
    side = int((pos.shape[1] - 1) ** 0.5)
    patches = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patches = torch.nn.functional.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :1], patches.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


def _dinov2_resize(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """facebookresearch/dinov2's DinoVisionTransformer.interpolate_pos_encoding for a grid x grid input (its package
    is not installed), from its formula: the grid resized by F.interpolate bicubic, no antialiasing, with
    scale_factor (grid + interpolate_offset) / M, interpolate_offset 0.1 (its default; hub models keep it)."""
    m = int((pos.shape[1] - 1) ** 0.5)
    s = float(grid + 0.1) / m
    patches = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
    patches = torch.nn.functional.interpolate(patches, scale_factor=(s, s), mode="bicubic", antialias=False)
    assert patches.shape[-2:] == (grid, grid)
    return torch.cat([pos[:, :1], patches.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])], dim=1)


def _hf_dinov2_resize(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """transformers' Dinov2Embeddings.interpolate_pos_encoding for a grid x grid input."""
    from transformers import Dinov2Config
    from transformers.models.dinov2.modeling_dinov2 import Dinov2Embeddings

    emb = Dinov2Embeddings(
        Dinov2Config(hidden_size=pos.shape[-1], num_attention_heads=2, patch_size=14, image_size=14 * 8)
    )
    emb.position_embeddings.data = pos
    return emb.interpolate_pos_encoding(torch.zeros(1, 1 + grid * grid, pos.shape[-1]), 14 * grid, 14 * grid)


def _hf_clip_resize(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """transformers' CLIPVisionEmbeddings.interpolate_pos_encoding for a grid x grid input."""
    from transformers import CLIPVisionConfig
    from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings

    emb = CLIPVisionEmbeddings(
        CLIPVisionConfig(hidden_size=pos.shape[-1], num_attention_heads=2, patch_size=16, image_size=16 * 8)
    )
    emb.position_embedding.weight.data = pos[0]
    return emb.interpolate_pos_encoding(torch.zeros(1, 1 + grid * grid, pos.shape[-1]), 16 * grid, 16 * grid)


POS_RESIZE = {  # family: (arch, the family's own resize of a (1, 1 + 8 * 8, C) table to a grid x grid one)
    "timm": ("vit_tiny_patch16_224", _timm_resize),
    "open_clip": ("ViT-B-16", _open_clip_resize),
    "eva_clip": ("EVA-CLIP-8B", _eva_clip_resize),
    "dinov2": ("vit_small_patch14_dinov2", _dinov2_resize),
    "hf_dinov2": ("vit_small_patch14_dinov2", _hf_dinov2_resize),
    "hf_clip": ("ViT-B-16", _hf_clip_resize),
}


@pytest.mark.parametrize("grid", [12, 5])
@pytest.mark.parametrize("family", sorted(POS_RESIZE))
def test_checkpoint_grid_resized_as_its_family_loader_does(family, grid):
    """from_torch(img_size=) on an 8x8 checkpoint grid, up to 12x12 and down to 5x5, equals the family's own
    PyTorch resize to 1e-6 (relative): antialiased bicubic for timm and open_clip, plain bicubic for EVA-CLIP and the
    transformers families (the two differ by far more than that), plain bicubic by DINOv2's offset scale factor for
    facebookresearch's layout."""
    arch, reference = POS_RESIZE[family]
    patch = dj.models.preset(arch).patch_size
    fields = dict(img_size=8 * patch, depth=1, width=64, num_heads=2, hidden=128)
    cfg = dj.models.preset(arch, **fields, **({"proj_dim": 0} if family == "hf_clip" else {}))
    cfg = dj.convert.resolve_config(cfg, family)
    params = dict(dj.models.init_params(cfg))
    table = np.random.default_rng(0).standard_normal(params["pos_embed"].shape).astype(np.float32)
    params["pos_embed"] = table
    sd = dj.convert.to_torch(cfg, params, family)
    new_cfg, new = dj.convert.from_torch(sd, family=family, arch=cfg, img_size=grid * patch)
    want = reference(torch.from_numpy(table), grid).detach().numpy()
    assert new_cfg.grid == grid and new["pos_embed"].shape == want.shape
    assert rel_err(new["pos_embed"], want) <= 1e-6


@pytest.mark.parametrize("family,antialias", [("eva_clip", False), ("timm", True)])
def test_convert_cli_keeps_the_familys_resize_for_other_image_sizes(tmp_path, family, antialias):
    """`dgmr-jax convert` of a checkpoint writes its family's resize into the model's config, so running the
    model at another image size resamples its position grid as that family's loader would."""
    from dgmr_jax.cli import main
    from dgmr_jax.io.checkpoint_io import save_safetensors
    from dgmr_jax.model_dir import load_config
    from dgmr_jax.models.vit import set_image_size

    arch, reference = POS_RESIZE[family]
    cfg = dj.models.preset(arch, img_size=8 * 14, patch_size=14, depth=1, width=64, num_heads=2, hidden=128)
    params = dict(dj.models.init_params(cfg))
    ckpt, arch_json, out = tmp_path / "ckpt.safetensors", tmp_path / "arch.json", tmp_path / "model"
    save_safetensors(ckpt, dj.convert.to_torch(cfg, params, family))
    arch_json.write_text(cfg.to_json())
    assert (
        main(["convert", "--checkpoint", str(ckpt), "--family", family, "--arch", str(arch_json), "--out", str(out)])
        == 0
    )
    saved, _ = load_config(out)
    assert saved.pos_resample_antialias is antialias
    _, resized = set_image_size(saved, params, 5 * 14)
    want = reference(torch.tensor(np.array(params["pos_embed"])), 5)
    assert rel_err(resized["pos_embed"], want) <= 1e-6
