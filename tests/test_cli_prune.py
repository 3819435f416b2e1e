"""End to end through the CLI: convert, prune (streamed from disk), export into PyTorch, and the errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from reference import images, rel_err, small_timm, timm, timm_outputs, to_nhwc, torch

import dgmr_jax as dj
from dgmr_jax.cli import main
from dgmr_jax.data import EvalBatches, ImageFolderSource
from dgmr_jax.io.checkpoint_io import save_safetensors
from dgmr_jax.model_dir import load_model
from dgmr_jax.models.preprocess import published
from dgmr_jax.models.tree import flatten
from dgmr_jax.prune.taylor import taylor_scores


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model, cfg, img = small_timm("vit_tiny_patch16_224", depth=12)  # the preset depth: --arch names it
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_safetensors(path, {k: v.numpy() for k, v in model.state_dict().items()})
    return model, cfg, path


@pytest.mark.slow
def test_convert_prune_export_loads_into_timm_with_the_same_widths(checkpoint, tmp_path, capsys):
    model, cfg, path = checkpoint
    assert main(["convert", "--arch", cfg.name, "--checkpoint", str(path), "--out", str(tmp_path / "m")]) == 0
    widths = [64, 128, 32] * 4
    hidden = ",".join(map(str, widths))
    assert main(["prune", "--model", str(tmp_path / "m"), "--hidden", hidden, "--out", str(tmp_path / "p")]) == 0
    assert "params 5.68M -> " in capsys.readouterr().out
    report = json.loads((tmp_path / "p" / "prune_report.json").read_text())
    assert [row["hidden_after"] for row in report["layers"]] == widths
    assert (tmp_path / "p" / "prune_curves.png").stat().st_size > 1000
    assert main(["export", "--model", str(tmp_path / "p"), "--out", str(tmp_path / "p.pth")]) == 0

    slim = timm.create_model(cfg.name, pretrained=False, img_size=cfg.img_size)
    for block, width in zip(slim.blocks, widths, strict=True):
        block.mlp = timm.layers.Mlp(cfg.width, width)
    slim.load_state_dict(torch.load(tmp_path / "p.pth", weights_only=True))  # strict
    slim.eval()
    pruned_cfg, params = load_model(tmp_path / "p")
    x = images(cfg.img_size)
    ours = dj.models.forward(pruned_cfg, params, to_nhwc(x))
    for key, ref in timm_outputs(slim, x).items():
        assert rel_err(ours[key], ref) <= 1e-5


@pytest.mark.slow
def test_streamed_prune_equals_in_memory_prune(checkpoint, tmp_path):
    model, cfg, path = checkpoint
    out = tmp_path / "p"
    assert main(["prune", "--checkpoint", str(path), "--arch", cfg.name, "--mlp-ratio", "0.5", "--out", str(out)]) == 0
    streamed_cfg, streamed = load_model(out)
    full_cfg, full = dj.convert.from_torch(path, arch=cfg)
    mem_cfg, mem = dj.prune.prune_mlp(full_cfg, full, mlp_ratio=0.5)
    assert streamed_cfg == mem_cfg
    a, b = flatten(streamed), flatten(mem)
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_taylor_prune_from_the_cli_equals_taylor_scores_in_memory(checkpoint, tmp_path):
    """--method taylor scores neurons on the first --taylor-images of a folder, then prunes like prune_mlp."""
    _, cfg, path = checkpoint
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(5):
        rgb = np.random.default_rng(i).integers(0, 256, (40, 36, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(folder / f"{i}.png")
    out = tmp_path / "p"
    argv = ["prune", "--checkpoint", str(path), "--arch", cfg.name, "--method", "taylor", "--mlp-ratio", "0.5"]
    argv += ["--taylor-data", str(folder), "--taylor-images", "4", "--taylor-batch", "2", "--out", str(out)]
    assert main(argv) == 0

    full_cfg, full = dj.convert.from_torch(path, arch=cfg)
    view = published(cfg.name).eval_view(cfg.img_size)  # what the checkpoint's arch was trained with
    batches = list(EvalBatches(ImageFolderSource(folder), batch_size=2, img_size=cfg.img_size, **view))
    scores = taylor_scores(full_cfg, full, [b["images"] for b in batches[:2]])  # the first 4 images
    mem_cfg, mem = dj.prune.prune_mlp(full_cfg, full, method="taylor", mlp_ratio=0.5, scores=scores)
    cli_cfg, cli = load_model(out)
    assert cli_cfg == mem_cfg
    a, b = flatten(cli), flatten(mem)
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    l2_cfg, l2 = dj.prune.prune_mlp(full_cfg, full, method="l2", mlp_ratio=0.5)
    assert not all(np.array_equal(a[k], flatten(l2)[k]) for k in a)  # the scores, not the weight norms, chose


def test_cli_errors_are_one_line_and_keep_existing_output(checkpoint, tmp_path, capsys):
    _, cfg, path = checkpoint
    keep = tmp_path / "existing"
    keep.mkdir()
    (keep / "precious.txt").write_text("mine")
    cases = [
        (
            ["prune", "--checkpoint", str(path), "--arch", cfg.name, "--out", str(keep)],
            "already exists and is not empty",
        ),
        (["prune", "--checkpoint", str(path), "--out", str(tmp_path / "a")], "needs both family= and arch="),
        (
            ["prune", "--checkpoint", str(path), "--arch", cfg.name, "--mlp-ratio", "9", "--out", str(tmp_path / "b")],
            "exceeds the current width 768",
        ),
        (["prune", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "c")], "is not a model directory"),
        (
            ["prune", "--checkpoint", str(path), "--arch", cfg.name, "--method", "taylor", "--out", str(keep / "t")],
            "--method taylor and --taylor-data",
        ),
        (
            [
                "convert",
                "--family",
                "open_clip",
                "--arch",
                cfg.name,
                "--checkpoint",
                str(path),
                "--out",
                str(tmp_path / "d"),
            ],
            "The keys fit family='timm'",
        ),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert (keep / "precious.txt").read_text() == "mine"
    assert not (tmp_path / "b").exists() and not (tmp_path / "d").exists()


def test_checkpoint_image_size_is_inferred_and_resampled(tmp_path):
    model, cfg, _ = small_timm("vit_small_patch14_dinov2")
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    loaded_cfg, _ = dj.convert.from_torch(sd, arch=cfg.replace(img_size=518))
    assert loaded_cfg.img_size == 28
    bigger_cfg, params = dj.convert.from_torch(sd, arch=cfg, img_size=56)
    assert bigger_cfg.img_size == 56 and params["pos_embed"].shape == (1, 1 + 16, cfg.width)
