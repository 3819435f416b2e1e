"""CLIP zero-shot classification and retrieval: exact answers on made-up embeddings, equality with open_clip /
torch on a tiny CLIP model, sharded text encoding, and `dgmr-jax eval --zeroshot --retrieval` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from reference import class_png_folders, converted_small_clip, rel_err, small_clip, to_nhwc, torch

import dgmr_jax as dj
from dgmr_jax.cli import main
from dgmr_jax.convert import text_from_torch
from dgmr_jax.core.parallel import make_mesh
from dgmr_jax.data import ImageFolderSource
from dgmr_jax.eval import EvalBatches, encode_texts, retrieval_recall, zeroshot_accuracy, zeroshot_classifier
from dgmr_jax.models.preprocess import CLIP_MEAN, CLIP_STD
from dgmr_jax.models.text import init_text_params
from dgmr_jax.models.tokenizer import Tokenizer

open_clip = pytest.importorskip("open_clip")


def test_zeroshot_accuracy_exact():
    classifier = np.eye(3, dtype=np.float32)  # (embed_dim, classes): class c points along axis c
    images = np.array([[1, 0.5, 0.2], [1, 0.5, 0.2], [1, 0.5, 0.2], [0, 0, 3]], np.float32)
    labels = np.array([0, 1, 2, 2])  # the true class ranks 1st, 2nd, 3rd, 1st
    assert zeroshot_accuracy(images, labels, classifier, ks=(1, 2, 3)) == {1: 0.5, 2: 0.75, 3: 1.0}
    with pytest.raises(ValueError, match=r"ks must lie in \[1, 3\]"):
        zeroshot_accuracy(images, labels, classifier, ks=(1, 5))
    with pytest.raises(ValueError, match=r"labels must be \(4,\) ints in \[0, 3\)"):
        zeroshot_accuracy(images, labels + 1, classifier)


def test_retrieval_recall_exact():
    images = np.eye(3, dtype=np.float32)
    captions = np.array([[0.2, 1, 0], [1, 0, 0], [0, 1, 0.5], [0.5, 0.4, 0.3]], np.float32)
    owners = np.array([0, 0, 1, 2])
    # caption -> image ranks of the true image: 1, 0, 0, 2; image -> best own caption ranks: 0, 1, 1
    recall = retrieval_recall(images, captions, owners, ks=(1, 2, 3))
    assert recall == {"image_to_text": {1: 1 / 3, 2: 1.0, 3: 1.0}, "text_to_image": {1: 0.5, 2: 0.75, 3: 1.0}}
    with pytest.raises(ValueError, match="1 images have no caption"):
        retrieval_recall(images, captions, np.array([0, 0, 1, 1]))
    with pytest.raises(ValueError, match=r"ks must lie in \[1, 3\]"):
        retrieval_recall(images, captions, owners, ks=(1, 5))


@pytest.mark.slow
def test_text_encoding_sharded_equals_one_device():
    cfg = dj.models.TextConfig(name="tiny", width=64, heads=4, layers=2, embed_dim=32)
    params = init_text_params(cfg, 0)
    tokens = Tokenizer()([f"caption number {i} of a few" for i in range(13)])
    one = encode_texts(cfg, params, tokens, batch=8, mesh=make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    for mesh in (make_mesh(4, 2, 1), make_mesh(2, 1, 4)):
        sharded = encode_texts(cfg, params, tokens, batch=8, mesh=mesh)
        assert sharded.shape == (13, 32) and rel_err(sharded, one) <= 1e-5
    assert rel_err(one, dj.models.encode_text(cfg, params, tokens)) <= 1e-5


def _torch_recall(scores: torch.Tensor, positive: torch.Tensor, k: int) -> float:
    """CLIP_benchmark's recall@k: a query is a hit when any positive is among its top-k scores."""
    hits = positive.gather(1, scores.topk(k, dim=1).indices).any(dim=1)
    return hits.sum().item() / len(hits)


CLASSES = ["cat", "dog", "red car", "number 7", "tree"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}.", "{} in the wild"]


@pytest.mark.slow
def test_zeroshot_and_retrieval_equal_open_clip_on_a_tiny_model():
    model, vision_cfg, text_cfg = small_clip()
    vision_cfg, vision = dj.convert.from_torch(model.state_dict(), family="open_clip", arch=vision_cfg)
    text_cfg, text = text_from_torch(model.state_dict(), text_cfg)
    x = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = np.random.default_rng(0).integers(0, len(CLASSES), 24)
    with torch.no_grad():
        ref_images = model.encode_image(x, normalize=True)
        ref_classifier = open_clip.build_zero_shot_classifier(
            model, open_clip.tokenize, CLASSES, TEMPLATES, num_classes_per_batch=2
        )
    images = dj.models.forward(vision_cfg, vision, to_nhwc(x))["pooled"]
    classifier = zeroshot_classifier(text_cfg, text, CLASSES, TEMPLATES, Tokenizer())
    assert classifier.shape == (32, 5) and rel_err(classifier, ref_classifier) <= 1e-5

    top5 = (100 * ref_images @ ref_classifier).topk(5, dim=1).indices
    ref_accuracy = {k: (top5[:, :k] == torch.from_numpy(labels)[:, None]).any(1).sum().item() / 24 for k in (1, 3, 5)}
    assert zeroshot_accuracy(images, labels, classifier, ks=(1, 3, 5)) == ref_accuracy
    assert 0 < ref_accuracy[1] < ref_accuracy[3] < 1  # a real ranking, not a degenerate one

    captions = [f"{CLASSES[i % 5]} seen {word} time {i}" for i in range(24) for word in ("one", "another")]
    owners = np.repeat(np.arange(24), 2)
    with torch.no_grad():
        ref_text = model.encode_text(open_clip.tokenize(captions), normalize=True)
    text_emb = encode_texts(text_cfg, text, Tokenizer()(captions), batch=16)
    scores = ref_text @ ref_images.T  # (captions, images)
    positive = torch.zeros(scores.shape, dtype=torch.bool)
    positive[torch.arange(48), torch.from_numpy(owners)] = True
    ref_recall = {
        "image_to_text": {k: _torch_recall(scores.T, positive.T, k) for k in (1, 5, 10)},
        "text_to_image": {k: _torch_recall(scores, positive, k) for k in (1, 5, 10)},
    }
    assert retrieval_recall(images, text_emb, owners) == ref_recall
    assert 0 < ref_recall["text_to_image"][5] < ref_recall["text_to_image"][10] < 1


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    """A tiny CLIP checkpoint, its vision tower converted by `dgmr-jax convert`, class folders of images and a
    retrieval jsonl over them."""
    root = tmp_path_factory.mktemp("clip")
    model = converted_small_clip(root)
    class_png_folders(root / "test", ("cat", "dog", "red_car"))
    lines = []
    for c, name in enumerate(("cat", "dog", "red_car")):
        for i in range(3):
            caption = [f"a {name.replace('_', ' ')} picture {i}", f"image {i} of class {c}"]
            lines.append(json.dumps({"image": f"test/{name}/{i}.png", "captions": caption}))
    (root / "retrieval.jsonl").write_text("\n".join(lines) + "\n")
    (root / "templates.txt").write_text("a photo of a {}.\nthe {} again\n")
    return root, model


@pytest.mark.slow
def test_eval_cli_zeroshot_and_retrieval_equal_open_clip(clip_files, capsys):
    root, model = clip_files
    out = root / "result.json"
    args = ["eval", "--model", str(root / "model"), "--train", "none", "--test", str(root / "test"), "--batch", "4"]
    clip = ["--clip-text", str(root / "clip.pt"), "--text-arch", str(root / "text.json"), "--zeroshot"]
    extra = ["--templates", str(root / "templates.txt"), "--retrieval", str(root / "retrieval.jsonl")]
    assert main(args + clip + extra + ["--out", str(out)]) == 0
    result = json.loads(out.read_text())

    # the same computation in open_clip / torch, on the same preprocessed images
    source = ImageFolderSource(root / "test")
    mean, std = CLIP_MEAN, CLIP_STD
    x = torch.from_numpy(next(iter(EvalBatches(source, batch_size=9, img_size=32, mean=mean, std=std)))["images"])
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    records = [json.loads(line) for line in (root / "retrieval.jsonl").read_text().splitlines()]
    assert [r["image"] for r in records] == [f"test/{p}" for p in source.relpaths]  # same image order
    captions = [c for r in records for c in r["captions"]]
    with torch.no_grad():
        images = model.encode_image(x.permute(0, 3, 1, 2), normalize=True)
        classifier = open_clip.build_zero_shot_classifier(
            model, open_clip.tokenize, ["cat", "dog", "red car"], ["a photo of a {}.", "the {} again"]
        )
        texts = model.encode_text(open_clip.tokenize(captions), normalize=True)
    top1 = ((images @ classifier).argmax(1) == labels).sum().item() / 9
    scores = texts @ images.T
    positive = torch.zeros(scores.shape, dtype=torch.bool)
    positive[torch.arange(18), torch.arange(9).repeat_interleave(2)] = True
    assert result["zeroshot"] == {"top1": top1, "templates": 2}
    assert result["retrieval"] == {
        "image_to_text": {str(k): _torch_recall(scores.T, positive.T, k) for k in (1, 5)},
        "text_to_image": {str(k): _torch_recall(scores, positive, k) for k in (1, 5)},
        "images": 9,
        "captions": 18,
    }
    assert (result["text_arch"], result["classes"], result["test_images"], "knn" in result) == ("tiny", 3, 9, False)
    printed = capsys.readouterr().out
    assert f"zero-shot top1 {top1:.4f} (9 images, 3 classes)" in printed
    assert "retrieval image to text: R@1 " in printed and "(9 images, 18 captions)" in printed


def test_eval_cli_clip_errors_come_before_any_work(clip_files, tmp_path, capsys):
    root, _ = clip_files
    base = ["eval", "--model", str(root / "model"), "--train", "none", "--test", str(root / "test")]
    text = ["--clip-text", str(root / "clip.pt"), "--text-arch", str(root / "text.json")]

    def error(*args: str) -> str:
        assert main([*base, *args]) == 2
        return capsys.readouterr().err

    assert "--text-arch --zeroshot need --clip-text CKPT" in error("--zeroshot", "--text-arch", "ViT-B-32")
    assert "--train none leaves nothing to evaluate" in error()
    assert "only used with --zeroshot and/or --retrieval" in error(*text)
    # without --text-arch the model's own arch name picks the text preset: ViT-B-32's is 512 wide, not 32
    assert "embeds images in 32 dims (pooled) but text tower 'ViT-B-32' in 512" in error(
        "--clip-text", str(root / "clip.pt"), "--zeroshot"
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "nope.png", "captions": ["x"]}) + "\n")
    assert f"{bad} line 1: image {tmp_path / 'nope.png'} does not exist" in error(*text, "--retrieval", str(bad))
    bad.write_text(json.dumps({"image": "nope.png", "captions": []}) + "\n")
    assert "line 1: expected" in error(*text, "--retrieval", str(bad))
    names = tmp_path / "names.txt"
    names.write_text("one\ntwo\n")
    assert "has 2 class names but --test has 3 classes" in error(*text, "--zeroshot", "--classnames", str(names))
    vision_only = tmp_path / "vision.safetensors"
    assert main(["export", "--model", str(root / "model"), "--out", str(vision_only), "--prefix", "visual."]) == 0
    capsys.readouterr()
    assert "holds no CLIP text tower" in error("--clip-text", str(vision_only), *text[2:], "--zeroshot")


@pytest.mark.slow
def test_in_loop_zeroshot_and_retrieval_equal_offline_eval(clip_files, tmp_path):
    """A student of the tiny CLIP vision tower distilled with zero-shot and retrieval evals in the loop (8 fake
    devices): the final in-loop numbers equal `dgmr-jax eval` of the exported student."""
    from dgmr_jax.core import config_file
    from dgmr_jax.distill.trainer import train

    root, _ = clip_files
    clip = {"clip_text": str(root / "clip.pt"), "text_arch": str(root / "text.json")}
    config = config_file.load(str(Path(__file__).parents[1] / "configs" / "cpu_tiny.py"))
    config.teacher.update(model_dir=str(root / "model"))
    config.data.update(kind="folder", path=str(root / "test"))
    config.evals = [
        {"kind": "zeroshot", "test": str(root / "test"), "templates": str(root / "templates.txt"), **clip},
        {"kind": "retrieval", "retrieval": str(root / "retrieval.jsonl"), **clip},
    ]
    summary = train(config, tmp_path / "run")
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    out = tmp_path / "offline.json"
    args = ["eval", "--model", str(summary["model_dir"]), "--train", "none", "--test", str(root / "test")]
    clip_args = ["--clip-text", clip["clip_text"], "--text-arch", clip["text_arch"], "--zeroshot"]
    extra = ["--templates", str(root / "templates.txt"), "--retrieval", str(root / "retrieval.jsonl")]
    assert main([*args, *clip_args, *extra, "--out", str(out)]) == 0
    offline = json.loads(out.read_text())
    assert last["step"] == 12 and last["eval/zeroshot/top1"] == offline["zeroshot"]["top1"]
    for direction in ("image_to_text", "text_to_image"):
        for k, v in offline["retrieval"][direction].items():
            assert last[f"eval/retrieval/{direction}_R@{k}"] == v
    assert json.loads((tmp_path / "run" / "best.json").read_text())["metric"] == "eval/zeroshot/top1"
