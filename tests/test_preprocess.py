"""Preprocessing travels with the model: published settings per preset, written by convert, overridable."""

from __future__ import annotations

import pytest
from reference import small_timm, timm

from dgmr_jax.cli import main
from dgmr_jax.io.checkpoint_io import save_safetensors
from dgmr_jax.model_dir import load_config
from dgmr_jax.models.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PUBLISHED,
    Preprocess,
    published,
)
from dgmr_jax.models.presets import PRESETS

TIMM_PRESETS = sorted(name for name in PUBLISHED if timm.is_model(name))


@pytest.mark.parametrize("name", TIMM_PRESETS)
def test_timm_presets_carry_timms_published_settings(name):
    cfg = timm.create_model(name, pretrained=False, depth=1).pretrained_cfg
    ours = PUBLISHED[name]
    assert (ours.mean, ours.std) == (tuple(cfg["mean"]), tuple(cfg["std"]))
    assert (ours.crop_pct, ours.interpolation) == (cfg["crop_pct"], cfg["interpolation"])


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.slow) if n in ("ViT-g-14", "ViT-bigG-14") else n  # giant open_clip models
        for n in sorted(n for n in PUBLISHED if n.startswith("ViT-"))
    ],
)
def test_open_clip_presets_carry_open_clips_settings(name):
    open_clip = pytest.importorskip("open_clip")
    cfg = open_clip.get_model_preprocess_cfg(open_clip.create_model(name, pretrained=None, device="meta"))
    ours = PUBLISHED[name]
    assert (ours.mean, ours.std, ours.interpolation) == (cfg["mean"], cfg["std"], cfg["interpolation"])
    assert cfg["resize_mode"] == "shortest" and ours.crop_pct == 1.0  # resize the shorter side to the input size


def test_every_preset_has_published_settings():
    assert set(PRESETS) == set(PUBLISHED)
    assert len(TIMM_PRESETS) == 21  # every timm-named preset is checked against timm's pretrained_cfg
    for name in ("EVA-CLIP-8B", "EVA-CLIP-18B"):  # EVA-CLIP's processor: OpenAI CLIP statistics, bicubic
        assert (PUBLISHED[name].mean, PUBLISHED[name].std) == (CLIP_MEAN, CLIP_STD)
    for name in ("InternViT-6B-448px-V2_5", "InternViT-300M-448px-V2_5"):  # InternVL's: ImageNet statistics
        assert (PUBLISHED[name].mean, PUBLISHED[name].std) == (IMAGENET_MEAN, IMAGENET_STD)


def _checkpoint(tmp_path, name: str, config_name: str | None = None) -> tuple[str, str]:
    """(checkpoint path, config .json path) of a shrunken seeded timm `name`; the config keeps the preset's
    name (so its published settings apply) unless `config_name` renames it."""
    model, cfg, _ = small_timm(name, depth=1)
    path = tmp_path / f"{name}.safetensors"
    save_safetensors(path, {k: v.numpy() for k, v in model.state_dict().items()})
    arch = tmp_path / f"{name}.json"
    arch.write_text(cfg.replace(name=config_name or cfg.name).to_json())
    return str(path), str(arch)


@pytest.mark.parametrize(
    "name,stats",
    [
        ("eva02_small_patch14_224", (CLIP_MEAN, CLIP_STD)),
        ("vit_base_patch16_clip_224", (CLIP_MEAN, CLIP_STD)),
        ("vit_small_patch14_dinov2", (IMAGENET_MEAN, IMAGENET_STD)),
    ],
)
def test_convert_records_the_archs_statistics(tmp_path, name, stats):
    ckpt, arch = _checkpoint(tmp_path, name)
    out = tmp_path / "model"
    assert main(["convert", "--checkpoint", ckpt, "--arch", arch, "--out", str(out)]) == 0
    cfg, meta = load_config(out)
    assert (tuple(meta["preprocess"]["mean"]), tuple(meta["preprocess"]["std"])) == stats
    assert Preprocess.from_meta(meta) == published(name)
    assert meta["preprocess"]["img_size"] == cfg.img_size


@pytest.mark.slow
def test_override_round_trips_through_convert_and_prune(tmp_path):
    ckpt, arch = _checkpoint(tmp_path, "vit_small_patch14_dinov2")
    flags = ["--mean", "0.1,0.2,0.3", "--std", "0.4,0.5,0.6", "--crop-pct", "0.875", "--interpolation", "bilinear"]
    model, pruned = tmp_path / "model", tmp_path / "pruned"
    assert main(["convert", "--checkpoint", ckpt, "--arch", arch, "--out", str(model), *flags]) == 0
    assert main(["prune", "--model", str(model), "--mlp-ratio", "2", "--out", str(pruned)]) == 0
    want = Preprocess((0.1, 0.2, 0.3), (0.4, 0.5, 0.6), crop_pct=0.875, interpolation="bilinear")
    for directory in (model, pruned):
        assert Preprocess.from_meta(load_config(directory)[1]) == want
    assert want.eval_view(28)["resize_size"] == 32  # floor(28 / 0.875)


def test_unknown_arch_needs_mean_and_std(tmp_path, capsys):
    ckpt, arch = _checkpoint(tmp_path, "vit_small_patch14_dinov2", config_name="my_vit")
    out = tmp_path / "model"
    assert main(["convert", "--checkpoint", ckpt, "--arch", arch, "--out", str(out)]) == 2
    assert "no published preprocessing is known for architecture 'my_vit'" in capsys.readouterr().err
    assert not out.exists()
    flags = ["--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5"]
    assert main(["convert", "--checkpoint", ckpt, "--arch", arch, "--out", str(out), *flags]) == 0
    assert Preprocess.from_meta(load_config(out)[1]) == Preprocess((0.5,) * 3, (0.5,) * 3)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--mean", "0.1,0.2"], "--mean takes three comma-separated numbers"),
        (["--std", "1,0,1"], "std finite and > 0"),
        (["--crop-pct", "1.5"], "crop_pct must be in (0, 1]"),
    ],
)
def test_bad_overrides_fail_before_reading_weights(tmp_path, capsys, flags, message):
    ckpt, arch = _checkpoint(tmp_path, "vit_small_patch14_dinov2")
    assert main(["convert", "--checkpoint", ckpt, "--arch", arch, "--out", str(tmp_path / "m"), *flags]) == 2
    assert message in capsys.readouterr().err
