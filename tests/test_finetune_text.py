"""`dgmr-jax finetune-text`: the text tower trains contrastively against frozen image embeddings, the same on 1
and 8 devices, resumes bit-identically after SIGKILL, raises retrieval recall on real digit images, skips bad
pairs by count and name, and exports a tower that open_clip loads strictly."""

from __future__ import annotations

import json
import math
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from distill_runs import _env
from PIL import Image
from reference import small_clip, torch

from dgmr_jax.cli import main
from dgmr_jax.data import open_images
from dgmr_jax.eval.run import DIGITS
from dgmr_jax.text_stage.defaults import text_config
from dgmr_jax.text_stage.finetune import clip_loss, finetune_text
from dgmr_jax.text_stage.pairs import read_pairs

open_clip = pytest.importorskip("open_clip")
ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ("a photo of the digit {}", "a handwritten {}", "the number {}")


def _write_digits(root: Path, per_class: int, offset: int = 0) -> None:
    """MNIST digits as PNGs, each with a same-stem .txt of three captions naming the digit."""
    mnist = open_images("mnist5k", split="train", labeled=True)
    root.mkdir(parents=True, exist_ok=True)
    count = dict.fromkeys(range(10), 0)
    for i in range(len(mnist.source)):
        label = int(mnist.labels[i])
        if count[label] >= per_class + offset:
            continue
        count[label] += 1
        if count[label] <= offset:
            continue
        stem = root / f"{label}_{count[label]:03d}"
        stem.with_suffix(".png").write_bytes(mnist.source[i])
        stem.with_suffix(".txt").write_text("\n".join(t.format(DIGITS[label]) for t in TEMPLATES) + "\n")
        if min(count.values()) >= per_class + offset:
            break


def _centered_clip(digits: Path):
    """A tiny open_clip CLIP (default init, so features vary with the input) whose image embeddings are centered
    on the digits (ln_post's bias cancels their mean): a stand-in for a trained tower whose features
    separate digits (nearest-neighbour digit accuracy ~0.9), where a random one embeds every digit alike."""
    torch.manual_seed(0)
    vision = dict(image_size=32, patch_size=16, width=64, layers=2, head_width=32)
    model = open_clip.model.CLIP(32, vision, dict(width=64, heads=2, layers=2)).eval()
    mean, std = np.asarray(open_clip.OPENAI_DATASET_MEAN), np.asarray(open_clip.OPENAI_DATASET_STD)
    pixels = [
        np.asarray(Image.open(p).convert("RGB").resize((32, 32), Image.BICUBIC)) for p in sorted(digits.glob("*.png"))
    ]
    x = torch.tensor((np.stack(pixels) / 255.0 - mean) / std, dtype=torch.float32).permute(0, 3, 1, 2)
    seen = {}
    hook = model.visual.ln_post.register_forward_hook(lambda mod, args, out: seen.update(x=args[0]))
    with torch.no_grad():
        model.encode_image(x)
        hook.remove()
        cls = torch.nn.functional.layer_norm(seen["x"][:, 0], (64,))
        model.visual.ln_post.bias.copy_(-model.visual.ln_post.weight * cls.mean(0))
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny CLIP checkpoint (logit scale 1/0.07, as CLIP starts), its vision tower as a model directory, the
    text config, and 8 MNIST digits per class with three captions each."""
    root = tmp_path_factory.mktemp("textft")
    _write_digits(root / "digits", per_class=8)
    _, vision_cfg, text_cfg = small_clip()
    torch.save(_centered_clip(root / "digits").state_dict(), root / "clip.pt")
    (root / "vision.json").write_text(vision_cfg.to_json())
    (root / "text.json").write_text(text_cfg.to_json())
    convert = ["convert", "--family", "open_clip", "--arch", str(root / "vision.json")]
    assert main([*convert, "--checkpoint", str(root / "clip.pt"), "--out", str(root / "model")]) == 0
    return root


def _config(**changes):
    c = text_config()
    c.global_batch = 16
    c.checkpoint_every = 4
    c.log_every = 1
    c.async_checkpoint = False
    c.data.embed_batch = 40
    c.eval_batch = 80
    c.optim.update(base_lr=2e-3, min_lr=1e-5, warmup_steps=2, total_steps=6)
    for key, value in changes.items():
        node = c
        *parents, leaf = key.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value
    return c


def _run(files: Path, workdir: Path, config, devices=None, pairs: str | None = None) -> dict:
    return finetune_text(
        config,
        workdir,
        model=str(files / "model"),
        clip_text=str(files / "clip.pt"),
        pairs=pairs or str(files / "digits"),
        text_arch=str(files / "text.json"),
        devices=devices,
    )


def _losses(workdir: Path) -> list[float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _rel(a, b) -> float:
    pairs = list(zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in pairs) / max(
        float(np.abs(np.asarray(y)).max()) for _, y in pairs
    )


def test_clip_loss_matches_open_clip():
    rng = np.random.default_rng(0)
    img, txt = rng.normal(size=(2, 6, 8)).astype(np.float32)
    ref = open_clip.ClipLoss()(
        torch.nn.functional.normalize(torch.from_numpy(img), dim=-1),
        torch.nn.functional.normalize(torch.from_numpy(txt), dim=-1),
        torch.tensor(math.exp(2.5)),
    )
    np.testing.assert_allclose(float(clip_loss(img, txt, np.float32(2.5))), float(ref), rtol=1e-5)
    clamped = float(clip_loss(img, txt, np.float32(9.0)))  # exp(9) > 100: clamped as open_clip does
    np.testing.assert_allclose(clamped, float(clip_loss(img, txt, np.float32(math.log(100)))), rtol=1e-6)


@pytest.mark.slow
def test_same_run_on_1_and_8_devices(files, tmp_path):
    assert len(jax.devices()) == 8
    one = _run(files, tmp_path / "one", _config(**{"mesh.data": 1}), devices=jax.devices()[:1])
    eight = _run(files, tmp_path / "eight", _config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}))
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "eight")
    assert len(a) == 6
    np.testing.assert_allclose(b, a, rtol=1e-5)
    assert _rel(eight["state"].params, one["state"].params) <= 1e-5
    assert _rel(eight["state"].opt_state, one["state"].opt_state) <= 1e-4


@pytest.mark.slow
def test_retrieval_recall_rises_on_digit_pairs(files, tmp_path):
    """80 MNIST digits with three captions each that name only the digit: 40 steps of the text tower against
    the frozen image embeddings lift image->text recall@1 and text->image recall@10 well above the original
    tower's. (Text->image recall@1 stays near its ceiling of 1/8: a caption cannot tell its own image from the
    other 7 images of its digit.)"""
    config = _config(**{"mesh.data": 1, "optim.total_steps": 40, "eval_every": 20, "checkpoint_every": 40})
    config.zeroshot = "mnist5k"  # and zero-shot digit classification of the 1,000 held-out digits
    summary = _run(files, tmp_path, config, devices=jax.devices()[:1])
    before, after = summary["eval_start"], summary["eval_end"]
    print(f"\nrecall before: {before}\nrecall after: {after}")
    assert (before["step"], after["step"]) == (0, 40)
    assert after["eval/zeroshot/top1"] >= before["eval/zeroshot/top1"] + 0.1
    assert after["eval/retrieval/image_to_text_R@1"] >= before["eval/retrieval/image_to_text_R@1"] + 0.2
    assert after["eval/retrieval/text_to_image_R@10"] >= before["eval/retrieval/text_to_image_R@10"] + 0.1
    assert after["eval/retrieval/mean_recall"] >= before["eval/retrieval/mean_recall"] + 0.1
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["metric"] == "eval/retrieval/mean_recall" and best["value"] >= after["eval/retrieval/mean_recall"]
    losses = _losses(tmp_path)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")  # the loss and recalls, drawn at the end


# --- resume --------------------------------------------------------------------------------------------------
STEPS = 24


def _cli(files: Path, workdir: Path, pairs: Path, *extra: str) -> list[str]:
    return [
        "finetune-text",
        "--model",
        str(files / "model"),
        "--clip-text",
        str(files / "clip.pt"),
        "--text-arch",
        str(files / "text.json"),
        "--pairs",
        str(pairs),
        "--workdir",
        str(workdir),
        "--config.global_batch=16",
        "--config.log_every=1",
        "--config.data.embed_batch=40",
        "--config.optim.base_lr=2e-3",
        "--config.optim.warmup_steps=2",
        *extra,
    ]


def _subprocess_cli(files: Path, workdir: Path, *extra: str) -> list[str]:
    args = _cli(files, workdir, files / "digits", f"--config.optim.total_steps={STEPS}", "--config.checkpoint_every=4")
    return [sys.executable, "-m", "dgmr_jax.cli", *args, *extra]


def _final_params(workdir: Path) -> dict:
    path = workdir / "checkpoints" / str(STEPS) / "state"
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as ckpt:
        meta = ckpt.metadata(path).item_metadata
        target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
        return ckpt.restore(path, target)


def _rows(workdir: Path) -> dict[tuple[int, str], dict]:
    """(step, kind) -> the last metrics row of that step and kind (a redone step overwrites its first try)."""
    out = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        kind = "eval" if "eval/retrieval/mean_recall" in row else "train"
        out[row["step"], kind] = {k: v for k, v in row.items() if k != "images_per_s"}
    return out


@pytest.fixture(scope="module")
def clean(files, tmp_path_factory):
    """An uninterrupted run in one process of 2 devices."""
    workdir = tmp_path_factory.mktemp("clean")
    done = subprocess.run(_subprocess_cli(files, workdir), env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    text_dir, summary = workdir / "text", workdir / "summary.json"  # where the last line says they are
    assert f"wrote {text_dir}: the fine-tuned text tower (text.safetensors); run summary {summary}" in done.stdout
    assert summary.is_file() and (text_dir / "text.safetensors").is_file()
    return workdir


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_is_bit_identical(files, clean, tmp_path):
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _subprocess_cli(files, killed, "--config.async_checkpoint=true"),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "8").is_dir():
        assert proc.poll() is None, f"run ended before the kill: {proc.communicate()[1][-2000:]}"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = [int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit()]
    assert max(saved) < STEPS
    resumed = subprocess.run(_subprocess_cli(files, killed), env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "reusing the 80 image embeddings" in resumed.stderr
    a, b = _final_params(killed), _final_params(clean)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    assert _rows(killed) == _rows(clean)  # every step's loss, lr, logit scale and the final recall, exactly
    exported = [(w / "text" / "text.safetensors").read_bytes() for w in (killed, clean)]
    assert exported[0] == exported[1]


@pytest.mark.multiprocess
def test_two_processes_train_like_one(files, clean, tmp_path):
    """2 processes of 1 device (jax.distributed: each embeds the images, the batch spans both) against 1 process
    of 2 devices: every logged loss and recall agrees, the params to 1e-5 of their largest magnitude, and process 0
    exports the merged CLIP file (the vision tower's restore is a collective)."""
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    hosts = {"DGMR_COORDINATOR": f"localhost:{port}", "DGMR_NUM_PROCESSES": "2"}
    procs = [
        subprocess.Popen(
            _subprocess_cli(files, tmp_path),
            env=_env(1, **hosts, DGMR_PROCESS_ID=str(i)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    two, one = _rows(tmp_path), _rows(clean)
    assert two.keys() == one.keys()
    for key, row in one.items():
        assert two[key].keys() == row.keys()
        for name, value in row.items():
            assert two[key][name] == pytest.approx(value, rel=1e-5, abs=1e-6), (key, name)
    a, b = _final_params(tmp_path), _final_params(clean)
    scale = max(float(np.abs(y).max()) for y in jax.tree_util.tree_leaves(b))
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert float(np.abs(x - y).max()) <= 1e-5 * scale
    from safetensors.numpy import load_file

    exported = [load_file(w / "text" / "clip.safetensors") for w in (tmp_path, clean)]
    assert exported[0].keys() == exported[1].keys()
    for name, value in exported[1].items():
        np.testing.assert_allclose(exported[0][name], value, rtol=1e-4, atol=1e-5 * scale)


# --- bad pairs, export, CLI ------------------------------------------------------------------------------------
def _bad_folder(files: Path, root: Path) -> Path:
    """20 good digit pairs plus four bad ones: an image without a caption file, an empty caption file, a caption
    file without an image, an image that does not decode."""
    good = sorted((files / "digits").glob("*.png"))[::4]
    root.mkdir()
    for png in good:
        (root / png.name).write_bytes(png.read_bytes())
        (root / png.with_suffix(".txt").name).write_text((png.with_suffix(".txt")).read_text())
    (root / "nocap.png").write_bytes(good[0].read_bytes())
    (root / "empty.png").write_bytes(good[1].read_bytes())
    (root / "empty.txt").write_text("\n  \n")
    (root / "orphan.txt").write_text("a caption without its image\n")
    (root / "corrupt.png").write_bytes(b"not a png")
    (root / "corrupt.txt").write_text("a photo of nothing\n")
    return root


@pytest.mark.slow
def test_bad_pairs_are_counted_named_and_skipped_then_the_export_loads_into_open_clip(files, tmp_path, capsys):
    pairs = _bad_folder(files, tmp_path / "pairs")
    listed = read_pairs(str(pairs))
    assert (len(listed), listed.num_captions) == (21, 61)  # 20 good + corrupt.png, which only decoding finds
    assert sorted(Path(n).name + ": " + why for n, why in listed.bad) == [
        "empty.png: caption file empty.txt is empty",
        "nocap.png: no caption file nocap.txt",
        "orphan.txt: caption file without an image",
    ]
    held_out = tmp_path / "held_out.jsonl"  # evaluation on other pairs: 10 digits, one caption each
    rows = [
        {"image": str(p), "captions": [p.with_suffix(".txt").read_text().splitlines()[0]]}
        for p in sorted((files / "digits").glob("*_008.png"))
    ]
    held_out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    workdir = tmp_path / "run"
    argv = _cli(files, workdir, pairs, "--config.optim.total_steps=3", "--config.checkpoint_every=3")
    argv += ["--eval-pairs", str(held_out)]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "20 images, 60 captions, 4 bad pairs skipped" in out
    warning = next(line for line in err.splitlines() if "warning: skipped 4 bad pairs" in line)
    for name in ("nocap.png", "empty.png", "orphan.txt", "corrupt.png: unreadable image"):
        assert name in warning
    summary = json.loads((workdir / "summary.json").read_text())
    assert (summary["pairs"]["images"], summary["pairs"]["bad"], summary["step"]) == (20, 4, 3)
    assert summary["eval_pairs"] == str(held_out) and summary["eval_end"]["step"] == 3
    assert 0 <= summary["eval_end"]["eval/retrieval/text_to_image_R@10"] <= 1
    assert json.loads((workdir / "pairs.json").read_text())["unreadable"] == [str(pairs / "corrupt.png")]
    assert main([*argv, "--config.data.seed=1"]) == 2  # a resume with other settings is refused
    assert "holds a run with other inputs (data.seed: 0 -> 1)" in capsys.readouterr().err

    # the export: text keys in open_clip's CLIP layout, loaded strictly into a fresh tiny CLIP
    from dgmr_jax.io.checkpoint_io import open_state_dict
    from dgmr_jax.models.text import TextConfig, encode_text
    from dgmr_jax.models.tokenizer import Tokenizer

    vision = dict(image_size=32, patch_size=16, width=64, layers=2, head_width=32)
    model = open_clip.model.CLIP(32, vision, dict(width=64, heads=2, layers=2)).eval()
    text_sd = {
        k: torch.from_numpy(np.array(v)) for k, v in open_state_dict(workdir / "text" / "text.safetensors").items()
    }
    expected = {k for k in model.state_dict() if not k.startswith("visual.") and k != "attn_mask"}
    assert set(text_sd) == expected
    clip_sd = {
        k: torch.from_numpy(np.array(v)) for k, v in open_state_dict(workdir / "text" / "clip.safetensors").items()
    }
    model.load_state_dict(clip_sd, strict=True)  # the merged CLIP: pruned vision tower + fine-tuned text tower
    original = torch.load(files / "clip.pt")
    assert all(torch.equal(clip_sd[k], original[k]) for k in original if k.startswith("visual."))
    assert not torch.equal(clip_sd["text_projection"], original["text_projection"])  # the tower trained
    captions = ["a photo of the digit seven", "the number two"]
    with torch.no_grad():
        ref = model.encode_text(open_clip.tokenize(captions)).numpy()
    text_cfg = TextConfig.from_json((workdir / "text" / "text_config.json").read_text())
    state = _final_state(workdir, 3)
    ours = np.asarray(encode_text(text_cfg, state["params"], Tokenizer()(captions)))
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.emulator
def test_pairs_and_workdir_on_cloud_storage_train_like_local_files(files, tmp_path):
    """The bad-pairs folder and a manifest uploaded to Cloud Storage (a local emulator) read as the local copies
    do (same captions, same bad pairs); a run with gs:// pairs and a gs:// workdir exports the same bytes as the
    run on the local folder."""
    from gcs_emulator import gcs_emulator

    from dgmr_jax.core.paths import as_path

    local = _bad_folder(files, tmp_path / "pairs")
    manifest = "".join(
        json.dumps({"image": f"pairs/{p.name}", "captions": [p.stem]}) + "\n" for p in local.glob("*.png")
    )
    steps = ["--config.optim.total_steps=3", "--config.checkpoint_every=3"]
    with gcs_emulator("dgmr-pairs"):
        for f in local.iterdir():
            as_path(f"gs://dgmr-pairs/pairs/{f.name}").write_bytes(f.read_bytes())
        as_path("gs://dgmr-pairs/pairs.jsonl").write_text(manifest)
        remote, listed = read_pairs("gs://dgmr-pairs/pairs"), read_pairs(str(local))
        assert remote.captions == listed.captions
        assert [(Path(n).name, why) for n, why in remote.bad] == [(Path(n).name, why) for n, why in listed.bad]
        from_manifest = read_pairs("gs://dgmr-pairs/pairs.jsonl")
        assert len(from_manifest) == 23 and all(n.startswith("gs://dgmr-pairs/pairs/") for n in from_manifest.names)
        assert main(_cli(files, "gs://dgmr-pairs/run", "gs://dgmr-pairs/pairs", *steps)) == 0
        exported = as_path("gs://dgmr-pairs/run/text/text.safetensors").read_bytes()
    assert main(_cli(files, tmp_path / "run", local, *steps)) == 0
    assert exported == (tmp_path / "run" / "text" / "text.safetensors").read_bytes()


def _final_state(workdir: Path, step: int) -> dict:
    path = workdir / "checkpoints" / str(step) / "state"
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as ckpt:
        meta = ckpt.metadata(path).item_metadata
        target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
        return ckpt.restore(path, target)


def test_manifest_bad_lines_are_counted_and_skipped(files, tmp_path):
    digits = sorted((files / "digits").glob("*.png"))
    lines = [
        json.dumps({"image": str(digits[0]), "captions": ["a photo of the digit zero", ""]}),
        json.dumps({"image": "missing.png", "captions": ["gone"]}),
        json.dumps({"image": str(digits[1]), "captions": []}),
        json.dumps({"image": str(digits[2]), "captions": ["  "]}),
        "{not json",
        json.dumps(["image", "captions"]),
        "",
        json.dumps({"image": str(digits[3]), "captions": ["zero again", "and again"]}),
    ]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    pairs = read_pairs(str(tmp_path / "pairs.jsonl"))
    assert pairs.captions == [["a photo of the digit zero"], ["zero again", "and again"]]
    assert [why.split(" (")[0] for _, why in pairs.bad] == [
        "image missing",
        "no caption",
        "no caption",
        "not JSON",
        'not a {"image": path, "captions": [...]} record',
    ]
    (tmp_path / "none.jsonl").write_text(lines[1] + "\n")
    from dgmr_jax.text_stage.pairs import require_good

    with pytest.raises(ValueError, match="has no good image-caption pair .1 bad: .*missing.png: image missing"):
        require_good(read_pairs(str(tmp_path / "none.jsonl")))


def test_mnist5k_pairs_are_the_digits_captioned_with_their_zeroshot_prompts():
    """--pairs mnist5k: the builtin digits of the split, each with the zero-shot prompts of its digit."""
    train, test = read_pairs("mnist5k"), read_pairs("mnist5k", split="test")
    assert (len(train), len(test), train.bad, train.spec) == (4000, 1000, [], "mnist5k")
    digits = open_images("mnist5k", split="test", labeled=True)
    label = int(digits.labels[7])
    word = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"][label]
    assert test.captions[7] == [f"a photo of the number {word}.", f"a photo of the digit {word}."]
    assert test.source[7] == digits.source[7] and test.names[7] == "mnist5k test #7"


def test_cli_errors_are_one_clear_line(files, tmp_path, capsys):
    def error(*argv: str) -> str:
        assert main(list(argv)) == 2
        return capsys.readouterr().err.strip()

    base = _cli(files, tmp_path / "w", files / "digits")
    at = base.index("--pairs") + 1
    assert "is not a folder (images + same-stem .txt captions), a .jsonl manifest, tfds:NAME or mnist5k" in error(
        *base[:at], str(tmp_path / "nope"), *base[at + 1 :]
    )
    other = tmp_path / "wide.json"
    other.write_text((files / "text.json").read_text().replace('"embed_dim": 32', '"embed_dim": 48'))
    arch = base.index("--text-arch") + 1
    assert "embeds images in 32 dims (pooled) but text tower 'tiny' in 48" in error(
        *base[:arch], str(other), *base[arch + 1 :]
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.png").write_bytes((files / "digits" / "0_001.png").read_bytes())
    assert "has no good image-caption pair (1 bad: " in error(*base[:at], str(empty), *base[at + 1 :])
    assert "unknown config field 'config.optim.nope'" in error(*base, "--config.optim.nope=1")
    ckpt = base.index("--clip-text") + 1
    assert "--clip-text nope.pt does not exist" in error(*base[:ckpt], "nope.pt", *base[ckpt + 1 :])
    for name in ("SiglipModel", "Siglip2Model"):
        siglip = tmp_path / name
        siglip.mkdir()
        (siglip / "config.json").write_text(json.dumps({"architectures": [name]}))
        assert error(*base[:ckpt], str(siglip), *base[ckpt + 1 :]) == (
            f"dgmr-jax finetune-text: error: --clip-text {siglip} is a {name} directory: finetune-text trains with "
            "CLIP's softmax loss, not SigLIP's sigmoid loss, so a SigLIP text tower is not fine-tuned yet (`dgmr-jax "
            "eval` reads it)"
        )
    no_ckpt = base[: ckpt - 1] + base[ckpt + 1 :]
    assert error(*no_ckpt) == (
        "dgmr-jax finetune-text: error: give --clip-text: the open_clip / EVA-CLIP checkpoint or transformers "
        "CLIPModel directory holding the text tower (or, for a quick try, --config.text.random_init=true to start "
        "from a seeded random init of --text-arch)"
    )
    assert error(*base, "--config.text.random_init=true") == (
        "dgmr-jax finetune-text: error: --clip-text and --config.text.random_init=true exclude each other: drop one "
        "(a random init ignores the checkpoint's weights)"
    )
    assert not (tmp_path / "w").exists()  # every refusal came before anything was written
    assert "global batch 12 does not divide" in error(*base, "--config.global_batch=12", "--config.mesh.data=8")
    blocker = tmp_path / "a_file"  # a workdir inside a file: unwritable for everyone, root included
    blocker.write_text("not a folder")
    workdir = base.index("--workdir") + 1
    assert error(*base[:workdir], str(blocker / "w"), *base[workdir + 1 :]) == (
        f"dgmr-jax finetune-text: error: --workdir {blocker / 'w'} cannot be written: {blocker} is not a folder; "
        "choose another --workdir"
    )
    with pytest.raises(SystemExit):
        main(["finetune-text", "--model", "m"])
    assert "the following arguments are required: --pairs, --workdir" in capsys.readouterr().err


@pytest.mark.slow
def test_embeddings_of_a_run_that_never_saved_a_step_are_replaced(files, tmp_path, capsys):
    """A run that stopped after embedding its images but before its first saved step (here: a zero-shot set
    that does not exist) pins nothing: a corrected rerun on other pairs embeds those instead of refusing."""
    workdir = tmp_path / "w"
    argv = _cli(files, workdir, files / "digits", "--config.optim.total_steps=2")
    assert main([*argv, f"--config.zeroshot={tmp_path / 'no_such_set'}"]) == 2
    assert sorted(p.name for p in workdir.iterdir()) == ["image_embeddings.npy", "pairs.json"]
    fewer = tmp_path / "fewer.jsonl"  # other pairs: the digits 0 to 4 only
    rows = [
        {"image": str(p), "captions": [p.with_suffix(".txt").read_text().splitlines()[0]]}
        for p in sorted((files / "digits").glob("[0-4]_*.png"))
    ]
    fewer.write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    assert main(_cli(files, workdir, fewer, "--config.optim.total_steps=2")) == 0
    assert len(json.loads((workdir / "pairs.json").read_text())["kept"]) == len(rows)
    assert "reusing the" not in capsys.readouterr().err


@pytest.mark.slow
def test_tfds_captions_dataset(files, tmp_path):
    """tfds:NAME with coco_captions' layout (image, captions/text), built locally: records without a caption are
    bad pairs, and a short run trains on the rest."""
    tfds = pytest.importorskip("tensorflow_datasets")
    digits = sorted((files / "digits").glob("*.png"))[:18]

    class DgmrTestCaptions(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            captions = tfds.features.Sequence({"text": tfds.features.Text()})
            features = tfds.features.FeaturesDict({"image": tfds.features.Image(), "captions": captions})
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, png in enumerate(digits):
                texts = [] if i in (4, 9) else png.with_suffix(".txt").read_text().splitlines()
                yield i, {"image": str(png), "captions": {"text": texts}}

    DgmrTestCaptions(data_dir=tmp_path / "tfds", file_format="array_record").download_and_prepare()
    pairs = read_pairs("tfds:dgmr_test_captions", data_dir=str(tmp_path / "tfds"))
    assert (len(pairs), pairs.num_captions, len(pairs.bad)) == (16, 48, 2)
    assert all(why == "no caption" and "dgmr_test_captions[train] record" in name for name, why in pairs.bad)
    assert all(caps[0].startswith("a photo of the digit ") for caps in pairs.captions)
    with pytest.raises(ValueError, match="has no caption feature 'caption'.*set --config.data.caption_key"):
        read_pairs("tfds:dgmr_test_captions", data_dir=str(tmp_path / "tfds"), caption_key="caption")
    config = _config(
        **{"mesh.data": 1, "optim.total_steps": 2, "checkpoint_every": 2, "data.data_dir": str(tmp_path / "tfds")}
    )
    summary = _run(files, tmp_path / "run", config, devices=jax.devices()[:1], pairs="tfds:dgmr_test_captions")
    assert (summary["step"], summary["pairs"]["images"], summary["pairs"]["bad"]) == (2, 16, 2)


@pytest.mark.slow
def test_custom_text_clip_layout_is_kept(files, tmp_path):
    """A CustomTextCLIP / EVA-CLIP checkpoint (text tower under "text.", logit_scale at the top level) is
    exported in that layout, and the merged state dict loads strictly into open_clip's CustomTextCLIP."""
    torch.manual_seed(1)
    vision = dict(image_size=32, patch_size=16, width=64, layers=2, head_width=32)
    custom = open_clip.model.CustomTextCLIP(32, vision, dict(width=64, heads=2, layers=2)).eval()
    torch.save(custom.state_dict(), tmp_path / "custom.pt")
    config = _config(**{"mesh.data": 1, "optim.total_steps": 1, "checkpoint_every": 1})
    finetune_text(
        config,
        tmp_path / "run",
        model=str(files / "model"),
        clip_text=str(tmp_path / "custom.pt"),
        pairs=str(files / "digits"),
        text_arch=str(files / "text.json"),
        devices=jax.devices()[:1],
    )
    from dgmr_jax.io.checkpoint_io import open_state_dict

    out = tmp_path / "run" / "text"
    text_sd = open_state_dict(out / "text.safetensors")
    assert {k for k in text_sd if not k.startswith("text.")} == {"logit_scale"}
    assert json.loads((out / "export.json").read_text())["prefix"] == "text."
    merged = {k: torch.from_numpy(np.array(v)) for k, v in open_state_dict(out / "clip.safetensors").items()}
    fresh = open_clip.model.CustomTextCLIP(32, vision, dict(width=64, heads=2, layers=2))
    fresh.load_state_dict(merged, strict=True)


QUICK_RECIPE = "text_quick_mnist.py"  # the README's one-minute run on digits (tests/test_pipeline.py), no schedule


@pytest.mark.parametrize(
    "recipe", sorted(p.name for p in (ROOT / "configs").glob("text_*.py") if p.name != QUICK_RECIPE)
)
def test_text_recipes_follow_the_official_schedule(recipe):
    """20 epochs of Flickr30k's 145,000 captions with 2 warm-up epochs, lr 1e-6 -> 1e-7, wd 0.04 -> 0.2, and only
    fields the defaults know."""
    from dgmr_jax.core import config_file
    from dgmr_jax.train.run import optim_config

    config = config_file.load(str(ROOT / "configs" / recipe))
    defaults = text_config()
    assert set(config.keys()) == set(defaults.keys()) and set(config.optim.keys()) == set(defaults.optim.keys())
    opt = optim_config(config)
    epoch = 145_000 / config.global_batch
    assert opt.total_steps == int(20 * epoch) and opt.warmup_steps == int(2 * epoch)
    assert (opt.base_lr, opt.min_lr, opt.wd_start, opt.wd_end) == (1e-6, 1e-7, 0.04, 0.2)
