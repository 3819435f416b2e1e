"""Bad checkpoints fail early with messages that name the problem."""

from __future__ import annotations

import subprocess
import sys

import jax
import numpy as np
import pytest
from reference import small_timm, state_dict_numpy, timm, torch
from safetensors.torch import load_file

import dgmr_jax as dj
from dgmr_jax.cli import main
from dgmr_jax.convert import CheckpointError
from dgmr_jax.io.convert import resolve_config
from dgmr_jax.io.keymaps import export_families
from dgmr_jax.model_dir import save_model


@pytest.fixture(scope="module")
def tiny():
    model, cfg, _ = small_timm("vit_tiny_patch16_224")
    return state_dict_numpy(model), cfg


def test_wrong_family_lists_keys_and_names_the_right_one(tiny):
    sd, cfg = tiny
    with pytest.raises(
        CheckpointError,
        match=r"family='open_clip'(.|\n)*missing keys: .*conv1\.weight"
        r"(.|\n)*The keys fit family='timm'",
    ):
        dj.convert.from_torch(sd, family="open_clip", arch=cfg)


def test_unknown_family_and_arch(tiny):
    sd, cfg = tiny
    with pytest.raises(CheckpointError, match="unknown family 'keras'; choose one of timm, open_clip"):
        dj.convert.from_torch(sd, family="keras", arch=cfg)
    with pytest.raises(ValueError, match="unknown architecture 'vit_huge_typo'; known presets: .*ViT-B-32"):
        dj.convert.from_torch(sd, arch="vit_huge_typo")


def test_missing_and_misshaped_keys_are_all_listed(tiny):
    sd, cfg = tiny
    broken = dict(sd)
    del broken["blocks.1.mlp.fc2.bias"]
    broken["blocks.0.attn.proj.weight"] = np.zeros((3, 3), np.float32)
    broken["extra.weight"] = np.zeros(1, np.float32)
    with pytest.raises(CheckpointError) as err:
        dj.convert.from_torch(broken, arch=cfg)
    text = str(err.value)
    assert "1 missing keys: blocks.1.mlp.fc2.bias" in text
    assert "1 unexpected keys: extra.weight" in text
    assert "blocks.0.attn.proj.weight (3, 3) -> blocks_0/attn/proj/kernel expects (192, 192)" in text


@pytest.mark.slow
def test_non_strict_loads_what_fits(tiny):
    sd, cfg = tiny
    partial_sd = {k: v for k, v in sd.items() if k != "head.bias"}
    _, params = dj.convert.from_torch(partial_sd, arch=cfg, strict=False)
    np.testing.assert_array_equal(params["head"]["kernel"], sd["head.weight"].T)
    assert params["head"]["bias"].shape == (1000,)


def test_files_safetensors_torch_truncated_and_not_a_checkpoint(tiny, tmp_path):
    from safetensors.numpy import save_file

    sd, cfg = tiny
    st = tmp_path / "model.safetensors"
    save_file(sd, str(st))
    pth = tmp_path / "model.pth"
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in sd.items()}}, pth)
    for path in (st, pth):
        _, params = dj.convert.from_torch(path, arch=cfg)
        np.testing.assert_array_equal(params["pos_embed"], sd["pos_embed"])
        cut = tmp_path / f"cut{path.suffix}"
        cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        with pytest.raises(CheckpointError, match=f"{cut} is not a readable"):
            dj.convert.from_torch(cut, arch=cfg)
    notes = tmp_path / "notes.pt"
    torch.save({"epoch": 3, "comment": "no weights here"}, notes)
    with pytest.raises(CheckpointError, match="is not a checkpoint: expected a mapping of parameter names"):
        dj.convert.from_torch(notes, arch=cfg)
    with pytest.raises(CheckpointError, match="does not exist"):
        dj.convert.from_torch(tmp_path / "nope.safetensors", arch=cfg)
    text = tmp_path / "notes.txt"
    text.write_text("not weights")
    with pytest.raises(CheckpointError, match="unknown checkpoint type"):
        dj.convert.from_torch(text, arch=cfg)


def test_bfloat16_checkpoint_round_trips_bit_exact(tiny):
    sd, cfg = tiny
    bf16 = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in sd.items()}
    cfg, params = dj.convert.from_torch(bf16, arch=cfg)
    back = dj.convert.to_torch(cfg, params)
    for k, v in bf16.items():
        assert back[k].dtype.name == "bfloat16"
        assert torch.equal(torch.from_numpy(back[k].view(np.int16)).view(torch.bfloat16), v), k


def _zeros_model(path, cfg, family: str) -> None:
    """A model directory of cfg with all-zero weights (no init to compile): what export reads."""
    save_model(
        path, cfg, jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), dj.models.param_shapes(cfg)), family=family
    )


def test_export_refuses_a_layout_the_model_does_not_have(tmp_path, capsys):
    """A timm ViT written as open_clip (or a CLIP tower as timm) would load into neither library: export stops in one
    line naming the model's family and the families it exports as, and writes nothing; its own layout still works."""
    vit = dj.models.preset("vit_tiny_patch16_224", depth=2, img_size=32)
    _zeros_model(tmp_path / "vit", vit, "timm")
    out = tmp_path / "vit.safetensors"
    argv = ["export", "--model", str(tmp_path / "vit"), "--family", "open_clip", "--out", str(out)]
    run = subprocess.run([sys.executable, "-m", "dgmr_jax.cli", *argv], capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr == (
        "dgmr-jax export: error: model vit_tiny_patch16_224 (family timm) cannot be written in the open_clip layout: "
        "it has a patch-embedding bias, a classification head, which open_clip's PyTorch model cannot hold; it "
        "exports as timm, hf_evaclip (--family timm)\n"
    )
    assert not out.exists()
    assert main(["export", "--model", str(tmp_path / "vit"), "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote {out}: 32 tensors in the timm layout (MLP widths [768])\n"
    timm.create_model(vit.name, depth=2, img_size=32).load_state_dict(load_file(out))  # strict

    clip = dj.models.preset("ViT-B-16", depth=2, img_size=32, width=64, num_heads=2, hidden=128, proj_dim=16)
    _zeros_model(tmp_path / "clip", clip, "open_clip")
    assert (
        main(["export", "--model", str(tmp_path / "clip"), "--family", "timm", "--out", str(tmp_path / "c.pth")]) == 2
    )
    assert capsys.readouterr().err == (
        "dgmr-jax export: error: model ViT-B-16 (family open_clip) cannot be written in the timm layout: it has a "
        "bias-free projection (proj), which timm's PyTorch model cannot hold; it exports as open_clip, hf_clip "
        "(--family open_clip)\n"
    )
    assert not (tmp_path / "c.pth").exists()


# each family's presets as that family converts them: every one exports back to it
OWN_FAMILY = {
    "timm": [n for n in dj.models.PRESETS if n.startswith(("vit_", "deit_", "eva"))],
    "open_clip": ["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-g-14", "ViT-bigG-14"],
    "eva_clip": [n for n in dj.models.PRESETS if n.startswith(("eva", "EVA-CLIP"))],
    "dinov2": [n for n in dj.models.PRESETS if n.endswith("dinov2")],
    "internvit": [n for n in dj.models.PRESETS if n.startswith("InternViT")],
}


@pytest.mark.parametrize("family", sorted(OWN_FAMILY))
def test_every_preset_exports_to_the_family_it_converts_from(family):
    for name in OWN_FAMILY[family]:
        assert family in export_families(resolve_config(name, family)), name
