"""Bad checkpoints fail early with messages that name the problem."""

from __future__ import annotations

import numpy as np
import pytest
from reference import small_timm, state_dict_numpy, torch

import dgmr_jax as dj
from dgmr_jax.convert import CheckpointError


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
