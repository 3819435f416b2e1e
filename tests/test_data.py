"""Unlabeled-image pipeline: sources, corrupt-file skipping, exact normalization, determinism, shards, resume."""

import io
import os
import re
import warnings

import numpy as np
import pytest
from PIL import Image

from dgmr_jax import data
from dgmr_jax.core.errors import UserError
from dgmr_jax.models.preprocess import CLIP_MEAN, CLIP_STD

tfds = pytest.importorskip("tensorflow_datasets")

MEAN, STD = CLIP_MEAN, CLIP_STD
BATCH, SIZE = 4, 16


def _encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def _noise(seed: int, h: int = 32, w: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


GOOD = {  # relative path -> encoded bytes; mixed formats, sizes, modes and depths
    **{f"a/img_{i:02d}.jpg": _encode(_noise(i, 28, 40), "JPEG") for i in range(9)},
    "a/b/c/deep.PNG": _encode(_noise(10), "PNG"),
    "a/b/photo.JPEG": _encode(_noise(11, 40, 28), "JPEG"),
    "anim.gif": _encode(_noise(12), "GIF"),
    "gray.png": _encode(_noise(13)[..., 0], "PNG"),
    "top.png": _encode(_noise(14), "PNG"),
}
# Sorted, the two corrupt files are not neighbours, so each is passed over exactly once per epoch.
CORRUPT = {
    "a/garbage.jpg": np.random.default_rng(99).bytes(500),
    "b/truncated.jpg": _encode(_noise(15), "JPEG")[:400],
}
OTHER = {"notes.txt": b"hello", "a/meta.json": b"{}", "a/b/README": b"readme"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    for rel, payload in {**GOOD, **CORRUPT, **OTHER}.items():
        os.makedirs(os.path.dirname(root / rel), exist_ok=True)
        (root / rel).write_bytes(payload)
    return data.ImageFolderSource(root)


def _loader(source, **kw):
    args = dict(batch_size=BATCH, img_size=SIZE, mean=MEAN, std=STD, num_epochs=1)
    return data.make_loader(source, **{**args, **kw})


def _expected_skips(source, indices) -> int:
    """Records DecodeOrSkip must pass over for these sampled indices: the run of corrupt records at each."""
    bad = [os.path.relpath(source.path(i), source.root) in CORRUPT for i in range(len(source))]
    total = 0
    for i in indices:
        run = 0
        while bad[(i + run) % len(bad)]:
            run += 1
        total += run
    return total


def test_folder_finds_images_at_any_depth(folder):
    assert sorted(folder.relpaths) == folder.relpaths == sorted([*GOOD, *CORRUPT])
    assert folder.ignored_files == len(OTHER)
    assert folder[folder.relpaths.index("top.png")] == GOOD["top.png"]


@pytest.mark.emulator
def test_folder_on_cloud_storage_lists_and_batches_like_the_local_one(folder):
    """The same files in a gs:// bucket (a local emulator): same records in the same order, gs:// paths, and the
    same batches."""
    from gcs_emulator import gcs_emulator

    from dgmr_jax.core.paths import as_path

    with gcs_emulator("dgmr-images"):
        for rel, payload in {**GOOD, **CORRUPT, **OTHER}.items():
            as_path(f"gs://dgmr-images/root/{rel}").write_bytes(payload)
        remote = data.ImageFolderSource("gs://dgmr-images/root")
        assert remote.relpaths == folder.relpaths and remote.ignored_files == len(OTHER)
        assert remote.path(0) == f"gs://dgmr-images/root/{folder.relpaths[0]}"
        for a, b in zip(_loader(remote, seed=3), _loader(folder, seed=3), strict=True):
            np.testing.assert_array_equal(a["images"], b["images"])
            np.testing.assert_array_equal(a["index"], b["index"])


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"no image files found under .*accepted extensions.*\.jpg"):
        data.ImageFolderSource(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        data.ImageFolderSource(tmp_path / "missing")


def test_corrupt_files_fail_to_decode():
    for payload in CORRUPT.values():
        with pytest.raises(Exception):  # noqa: B017 - Pillow raises several types; any failure counts
            data.decode_rgb(payload)
    assert data.decode_rgb(GOOD["gray.png"]).mode == "RGB"


def test_full_epoch_batches_and_exact_skip_count(folder):
    batches = list(_loader(folder, seed=3))
    assert len(batches) == len(folder) // BATCH
    counter = data.SkipCounter()
    for batch in batches:
        assert batch["images"].shape == (BATCH, SIZE, SIZE, 3) and batch["images"].dtype == np.float32
        assert batch["skipped"].shape == (BATCH,) and batch["index"].dtype == np.int64
        counter.update(batch)
    indices = np.concatenate([b["index"] for b in batches])
    assert sorted(indices) == list(range(len(folder)))
    assert counter.total == _expected_skips(folder, indices) == len(CORRUPT)
    assert str(counter) == f"{len(CORRUPT)} corrupt/unreadable files skipped so far"


def test_a_file_skipped_often_is_warned_about_and_counted_once(folder, caplog):
    """Over three epochs each corrupt file is passed over three times, but named in one warning and counted once;
    so is it by an eval set read three times."""
    batches = list(_loader(folder, seed=3, num_epochs=3))
    counter = data.SkipCounter()
    for batch in batches:
        counter.update(batch)
    assert sum(data.skipped_total(b) for b in batches) == 3 * len(CORRUPT)
    assert counter.total == len(CORRUPT) and counter.records == {folder.relpaths.index(rel) for rel in CORRUPT}
    evals = data.EvalBatches(folder, batch_size=BATCH, img_size=SIZE, mean=MEAN, std=STD)
    for _ in range(3):
        assert sum(len(b["index"]) for b in evals) == len(GOOD)
    warned = sorted(r.getMessage().split(" of ")[0] for r in caplog.records if r.levelname == "WARNING")
    assert warned == sorted(2 * [f"skipping unreadable image {folder.root}/{rel}" for rel in CORRUPT])


def test_a_failed_read_is_tried_again_bytes_that_do_not_decode_are_not():
    class Flaky:
        """Record 0 fails its first read (a passing storage error); record 1 never decodes."""

        def __init__(self):
            self.reads = {0: 0, 1: 0, 2: 0}

        def __len__(self):
            return 3

        def __getitem__(self, i):
            self.reads[i] += 1
            if i == 0 and self.reads[0] == 1:
                raise OSError("connection reset")
            return b"not an image" if i == 1 else GOOD["top.png"]

    source = Flaky()
    decode = data.DecodeOrSkip(source)
    assert [int(decode.map(0)["record"]) for _ in range(3)] == [2, 0, 0]
    assert [int(decode.map(1)["record"]) for _ in range(3)] == [2, 2, 2]
    assert source.reads == {0: 3, 1: 1, 2: 4}


def test_passed_over_records_wrap_around_the_source():
    assert data.transforms.passed_over(2, 2, 4) == [2, 3]
    assert data.transforms.passed_over(8, 3, 1) == [8, 9, 0]  # a source of 10 records
    assert data.transforms.passed_over(9, 2, 1) == [9, 0]
    assert data.transforms.passed_over(5, 0, 5) == []


def test_the_pixel_limit_is_ours_and_can_be_raised(monkeypatch):
    """decode_rgb refuses an image over its limit from the header, says how to raise it, and reads it once raised,
    even past Pillow's own guard (which neither warns nor refuses then, on decode or crop)."""
    png = _encode(_noise(0, 40, 50), "PNG")
    message = (
        "50x40 is 2,000 pixels, over the limit of 1,999: raise it with DGMR_MAX_IMAGE_PIXELS=N (or a recipe's "
        "config.data.max_image_pixels) to read this image"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        data.decode_rgb(png, 1999)
    monkeypatch.setenv("DGMR_MAX_IMAGE_PIXELS", "1999")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        data.decode_rgb(png)
    monkeypatch.setenv("DGMR_MAX_IMAGE_PIXELS", "2000")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # Pillow's guard would refuse 2,000 pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        img = data.decode_rgb(png)
        assert img.size == (50, 40)
        data.random_resized_crop(img, 8, (0.9, 1.0), (3 / 4, 4 / 3), np.random.default_rng(0))
    monkeypatch.setenv("DGMR_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ValueError, match="DGMR_MAX_IMAGE_PIXELS='lots': set it to a positive number of pixels"):
        data.decode_rgb(png)


def test_corrupt_record_is_replaced_by_the_next_one(folder):
    batches = list(_loader(folder, train=False))
    images = np.concatenate([b["images"] for b in batches])
    skipped = np.concatenate([b["skipped"] for b in batches])
    assert list(np.concatenate([b["index"] for b in batches])) == list(range(len(folder)))  # eval: source order
    for rel in CORRUPT:
        i = folder.relpaths.index(rel)
        assert skipped[i] == 1
        np.testing.assert_array_equal(images[i], images[i + 1])
    assert skipped.sum() == len(CORRUPT)


def test_normalization_matches_manual_bicubic_resize(folder):
    """scale (1, 1) and ratio (1, 1) on a square image crop nothing: a plain bicubic resize, then normalize."""
    i = folder.relpaths.index("top.png")
    for batch in _loader(folder, scale=(1.0, 1.0), ratio=(1.0, 1.0)):
        if i in batch["index"]:
            got = batch["images"][list(batch["index"]).index(i)]
    img = Image.open(io.BytesIO(GOOD["top.png"])).convert("RGB").resize((SIZE, SIZE), Image.BICUBIC)
    want = (np.asarray(img, np.float32) / 255 - np.float32(MEAN)) / np.float32(STD)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_crop_follows_torchvision_rules():
    rng = np.random.default_rng(0)
    for _ in range(50):
        top, left, h, w = data.random_resized_crop_box(40, 28, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= top <= 28 - h and 0 <= left <= 40 - w and 3 / 4 - 0.1 < w / h < 4 / 3 + 0.1
    # No square crop of the full area fits a 40x20 image: fall back to the largest centered square.
    assert data.random_resized_crop_box(40, 20, (1.0, 1.0), (1.0, 1.0), rng) == (0, 10, 20, 20)
    img = Image.fromarray(_noise(0, 28, 40))
    want = img.resize((22, 16), Image.BICUBIC).crop((3, 0, 19, 16))
    np.testing.assert_array_equal(np.asarray(data.resize_center_crop(img, 16)), np.asarray(want))


def test_same_seed_same_batches_other_seed_other_order(folder):
    def take(seed, n=6):  # 6 batches run past the end of the first epoch
        it = iter(_loader(folder, seed=seed, num_epochs=None, flip=True))
        return [next(it) for _ in range(n)]

    first, again, other = take(0), take(0), take(1)
    for a, b in zip(first, again, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(np.stack([b["index"] for b in first]), np.stack([b["index"] for b in other]))


def test_shards_are_disjoint_and_cover_the_data(folder):
    shards = [
        np.concatenate([b["index"] for b in _loader(folder, shard_index=k, shard_count=2, batch_size=2)])
        for k in range(2)
    ]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(np.concatenate(shards)) == list(range(len(folder)))


def test_resume_continues_exactly(folder):
    it = iter(_loader(folder, num_epochs=None, flip=True))
    for _ in range(3):
        next(it)
    state = data.loader_state(it)
    want = [next(it) for _ in range(3)]  # crosses into the second epoch

    resumed = iter(_loader(folder, num_epochs=None, flip=True))
    data.restore_loader(resumed, state)
    for a in want:
        b = next(resumed)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])

    with pytest.raises(ValueError, match="cannot resume the data loader"):
        data.restore_loader(iter(_loader(folder, num_epochs=None, seed=7)), state)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(batch_size=0), "batch_size must be a positive"),
        (dict(img_size=0), "img_size must be positive"),
        (dict(shard_index=2, shard_count=2), r"shard_index must be in \[0, shard_count=2\)"),
        (dict(shard_count=5), "fewer than one batch of 4: lower batch_size or shard_count"),
        (dict(batch_size=17), "fewer than one batch of 17"),
        (dict(scale=(1.0, 0.5)), "scale must satisfy"),
        (dict(max_image_pixels=-1), r"max_image_pixels must be >= 0 \(0: \$DGMR_MAX_IMAGE_PIXELS or the default\)"),
    ],
)
def test_bad_arguments_fail_early(folder, kw, match):
    with pytest.raises(ValueError, match=match):
        _loader(folder, **kw)


def test_array_record_round_trip(tmp_path, monkeypatch):
    records = [GOOD["top.png"], GOOD["a/img_00.jpg"], CORRUPT["a/garbage.jpg"], *list(GOOD.values())[:5]]
    assert data.write_array_record(tmp_path / "part-0.array_record", records[:4]) == 4
    data.write_array_record(tmp_path / "part-1.array_record", records[4:])
    monkeypatch.chdir(tmp_path.parent)  # typed relative, held (and recorded by a run) absolute
    source = data.ArrayRecordSource(f"{tmp_path.name}/part-*.array_record")
    assert source.paths == [str(tmp_path / "part-0.array_record"), str(tmp_path / "part-1.array_record")]
    assert len(source) == len(records) and [source[i] for i in range(len(source))] == records
    assert sum(data.skipped_total(b) for b in _loader(source)) == 1
    with pytest.raises(ValueError, match="matches no file"):
        data.ArrayRecordSource(tmp_path / "missing.array_record")
    with pytest.raises(ValueError, match=r"^gs://b/x.array_record: ArrayRecord files are written to a local disk"):
        data.write_array_record("gs://b/x.array_record", records)


@pytest.mark.emulator
def test_array_record_shards_on_cloud_storage_read_like_local_ones(tmp_path):
    """Shards written here and copied to a gs:// bucket (a local emulator) are read in place, by the glob a
    pod's data config gives (--config.data.path=gs://.../train-*.array_record), record for record."""
    from gcs_emulator import gcs_emulator

    from dgmr_jax.core.paths import as_path

    records = list(GOOD.values()) + list(CORRUPT.values())
    for k in range(3):
        data.write_array_record(tmp_path / f"train-{k:05d}-of-00003.array_record", records[k::3])
    local = data.ArrayRecordSource(str(tmp_path / "train-*.array_record"))
    with gcs_emulator("dgmr-shards"):
        for shard in sorted(tmp_path.glob("*.array_record")):
            as_path(f"gs://dgmr-shards/imagenet/{shard.name}").write_bytes(shard.read_bytes())
        images = data.open_images("gs://dgmr-shards/imagenet/train-*.array_record")
        assert images.source.paths == [
            f"gs://dgmr-shards/imagenet/train-{k:05d}-of-00003.array_record" for k in range(3)
        ]
        assert [images.source[i] for i in range(len(images))] == [local[i] for i in range(len(local))]
        assert sorted(local[i] for i in range(len(local))) == sorted(records)


@pytest.mark.parametrize("keep", [0.99, 0.5, 0.0])
def test_a_truncated_array_record_file_is_named(tmp_path, keep):
    """An interrupted copy leaves a short shard: opening the set names that file, in one line."""
    for part in range(2):
        data.write_array_record(tmp_path / f"part-{part}.array_record", list(GOOD.values()))
    short = tmp_path / "part-1.array_record"
    size = int(short.stat().st_size * keep)
    with short.open("r+b") as f:
        f.truncate(size)
    with pytest.raises(UserError) as err:
        data.ArrayRecordSource(str(tmp_path / "part-*.array_record"))
    message = str(err.value)
    assert message.startswith(f"ArrayRecord file {short} is truncated or damaged ({size} bytes: ")
    assert message.endswith("); write or copy it again") and "\n" not in message


class DgmrTestImages(tfds.core.GeneratorBasedBuilder):
    """Six labeled noise images, built locally without TensorFlow or network."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = {"image": tfds.features.Image(), "label": tfds.features.ClassLabel(num_classes=2)}
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(6):
            yield i, {"image": _encode(_noise(100 + i), "PNG"), "label": i % 2}


def test_tfds_source(tmp_path):
    DgmrTestImages(data_dir=tmp_path / "tfds", file_format="array_record").download_and_prepare()
    source = data.TfdsSource("dgmr_test_images", data_dir=tmp_path / "tfds")
    assert len(source) == 6
    assert sorted(data.decode_rgb(source[i]).tobytes() for i in range(6)) == sorted(
        _noise(100 + i).tobytes() for i in range(6)
    )
    batches = list(_loader(source, batch_size=3))
    assert len(batches) == 2 and sum(data.skipped_total(b) for b in batches) == 0

    with pytest.raises(ValueError, match="is not prepared under .*never downloads"):
        data.TfdsSource("dgmr_test_images", data_dir=tmp_path / "empty")
    with pytest.raises(ValueError, match="not found"):
        data.TfdsSource("no_such_dataset_xyz", data_dir=tmp_path / "tfds")
    with pytest.raises(ValueError, match="has no feature 'img'"):
        data.TfdsSource("dgmr_test_images", data_dir=tmp_path / "tfds", image_key="img")


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(folder):
    """Sources and transforms pickle into grain workers; one worker reproduces the in-process batches."""
    for a, b in zip(_loader(folder, flip=True), _loader(folder, flip=True, worker_count=1), strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
