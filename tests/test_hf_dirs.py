"""Hugging Face directories in: tiny transformers models saved by save_pretrained with a small max_shard_size (really
sharded, .safetensors, and .bin as transformers 4 wrote it), opened without family/arch, at parity with
transformers' own classes (<= 1e-5, pooled and tokens), converted and pruned through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from reference import class_png_folders, images, randomize, rel_err, to_nhwc, torch

import dgmr_jax as dj
from dgmr_jax.cli import main
from dgmr_jax.io.checkpoint_io import SafetensorsFile, ShardedCheckpoint, save_safetensors
from dgmr_jax.io.hf_config import CLASSES, hf_layout
from dgmr_jax.io.open import open_model
from dgmr_jax.model_dir import load_model
from dgmr_jax.models.tree import flatten

transformers = pytest.importorskip("transformers")

TOL = 1e-5
SHARD = "20KB"  # a 2-layer, 32-wide tower is ~60 KB: several shards
_VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14)
_TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=99)
_TEXT |= dict(bos_token_id=0, eos_token_id=1, pad_token_id=1)
# label -> (class name, config class, config kwargs)
MODELS = {
    "Dinov2Model": ("Dinov2Model", "Dinov2Config", dict(_VISION, mlp_ratio=2)),
    "Dinov2Model-swiglu": ("Dinov2Model", "Dinov2Config", dict(_VISION, mlp_ratio=4, use_swiglu_ffn=True)),
    "Dinov2WithRegistersModel": (
        "Dinov2WithRegistersModel",
        "Dinov2WithRegistersConfig",
        dict(_VISION, mlp_ratio=2, num_register_tokens=2),
    ),
    "CLIPVisionModel": ("CLIPVisionModel", "CLIPVisionConfig", dict(_VISION, intermediate_size=64)),
    "CLIPVisionModelWithProjection": (
        "CLIPVisionModelWithProjection",
        "CLIPVisionConfig",
        dict(_VISION, intermediate_size=64, projection_dim=16, hidden_act="gelu"),
    ),
    "CLIPModel": (
        "CLIPModel",
        "CLIPConfig",
        dict(vision_config=dict(_VISION, intermediate_size=64), text_config=_TEXT, projection_dim=16),
    ),
}


def build(label: str, seed: int = 0):
    """The transformers model of `label` from its small config, with seeded weights."""
    cls, config_cls, kwargs = MODELS[label]
    config = getattr(transformers, config_cls)(**kwargs)
    config._attn_implementation = "eager"
    return randomize(getattr(transformers, cls)(config), seed)


def as_bin_shards(folder: Path) -> None:
    """Rewrite save_pretrained's safetensors shards as transformers 4's sharded .bin (pytorch_model-*.bin and
    pytorch_model.bin.index.json; transformers 5 writes only safetensors)."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    names = {}
    for shard in sorted(set(index["weight_map"].values())):
        new = shard.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
        tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in dj.convert.load_state_dict(folder / shard).items()}
        torch.save(tensors, folder / new)
        (folder / shard).unlink()
        names[shard] = new
    index["weight_map"] = {k: names[v] for k, v in index["weight_map"].items()}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (folder / "model.safetensors.index.json").unlink()


def saved(label: str, root: Path, fmt: str = "safetensors", seed: int = 0):
    """(model, its sharded save_pretrained directory in `fmt`)."""
    model, folder = build(label, seed), root / f"{label}-{fmt}"
    model.save_pretrained(folder, max_shard_size=SHARD)
    if fmt == "bin":
        as_bin_shards(folder)
    return model, folder


def reference_outputs(model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Tokens and pooled vector as this tool defines them: DINOv2's last_hidden_state (after its final norm) and
    pooler_output; CLIP's tokens after post_layernorm (transformers applies it to the class token only) and
    pooler_output, projected by visual_projection where the class has one."""
    tower = getattr(model, "vision_model", model)  # transformers 5's CLIPVisionModel is the tower itself
    with torch.no_grad():
        out = tower(pixel_values=x)
        if not hasattr(tower, "post_layernorm"):
            return {"tokens": out.last_hidden_state, "pooled": out.pooler_output}
        pooled = out.pooler_output
        if hasattr(model, "visual_projection"):
            pooled = model.visual_projection(pooled)
        return {"tokens": tower.post_layernorm(out.last_hidden_state), "pooled": pooled}


def assert_parity(label: str, cfg, params, model) -> None:
    x = images(28)
    ours = dj.models.forward(cfg, params, to_nhwc(x))
    for key, ref in reference_outputs(model, x).items():
        err = float(np.abs(np.asarray(ours[key], np.float64) - ref.numpy()).max())
        print(f"PARITY {label:30s} {key:7s} max_abs={err:.2e}")
        assert err <= TOL, (label, key, err)


@pytest.mark.parametrize("fmt", ["safetensors", pytest.param("bin", marks=pytest.mark.slow)])
@pytest.mark.parametrize("label", sorted(MODELS))
def test_sharded_directory_opens_without_family_or_arch_at_parity(label, fmt, tmp_path):
    model, folder = saved(label, tmp_path, fmt)
    index = folder / ("model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json")
    shards = {f for f in os.listdir(folder) if f.endswith(f".{fmt}")}
    assert len(shards) >= 3 and len(set(json.loads(index.read_text())["weight_map"].values())) == len(shards)
    if fmt == "bin":  # the rewritten shards are what transformers itself reads as a sharded .bin checkpoint
        again = type(model).from_pretrained(folder)
        mine, theirs = model.state_dict(), again.state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    source = open_model(folder)  # the directory, or the index file alone
    assert source.meta["family"] == CLASSES[MODELS[label][0]][0] and source.cfg.name == folder.name
    assert open_model(index).cfg == source.cfg
    assert_parity(f"{label} ({fmt})", source.cfg, source.load(), model)


def test_shards_open_only_when_a_layer_needs_them(tmp_path, monkeypatch):
    """Key names come from the index; reading block 0 opens only the shards that hold block 0's tensors."""
    _, folder = saved("Dinov2Model", tmp_path)
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    opened = []
    real = SafetensorsFile.__init__

    def recording(self, path):
        opened.append(os.path.basename(path))
        real(self, path)

    monkeypatch.setattr(SafetensorsFile, "__init__", recording)
    source = open_model(folder)  # reads the position table alone, for the image size it was trained at
    assert opened == [index["embeddings.position_embeddings"]] and source.key_problems() == []
    opened.clear()
    source.block(0)
    wanted = {v for k, v in index.items() if k.startswith("encoder.layer.0.")}
    assert set(opened) == wanted and len(wanted) < len(set(index.values()))


@pytest.mark.slow
def test_convert_without_family_or_arch_through_the_cli(tmp_path):
    """A user's `dgmr-jax convert --checkpoint DIR`: the .bin shards and config.json give everything, the image
    processor's preprocessor_config.json the preprocessing; the model directory computes what transformers does."""
    model, folder = saved("CLIPVisionModelWithProjection", tmp_path, "bin")
    processor = dict(image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.4], resample=3, do_center_crop=True)
    (folder / "preprocessor_config.json").write_text(
        json.dumps(processor | dict(size={"shortest_edge": 32}, crop_size=28))
    )
    out = tmp_path / "model"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    argv = [sys.executable, "-m", "dgmr_jax.cli", "convert", "--checkpoint", str(folder), "--out", str(out)]
    run = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith(f"wrote {out}: {folder.name}, ")
    assert "preprocess mean (0.4, 0.5, 0.6), std (0.2, 0.3, 0.4), crop_pct 0.875, bicubic" in run.stdout
    cfg, params = load_model(out)
    assert cfg.proj_dim == 16 and cfg.mlp_type == "gelu"
    assert_parity("CLIPVisionModelWithProjection (cli)", cfg, params, model)

    bare = tmp_path / "bare"  # weights without a config.json: one line naming what to pass, nothing written
    bare.mkdir()
    save_safetensors(bare / "model.safetensors", {"w": np.zeros(2, np.float32)})
    run = subprocess.run(
        [*argv[:5], str(bare), "--out", str(tmp_path / "never")], capture_output=True, text=True, env=env
    )
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        f"dgmr-jax convert: error: {bare} has no config.json naming its class: pass --family and --arch "
        "(family= and arch=) for its layout and architecture"
    ]
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_prune_a_sharded_directory_equals_pruning_in_memory(tmp_path):
    """`prune --checkpoint DIR` streams the shards; the result equals prune_mlp on the whole converted model and
    loads into transformers' class built with the pruned width (64 -> 32 neurons: DINOv2's mlp_ratio 2 -> 1)."""
    _, folder = saved("Dinov2Model", tmp_path)
    out = tmp_path / "pruned"
    assert main(["prune", "--checkpoint", str(folder), "--hidden", "32", "--out", str(out)]) == 0
    streamed_cfg, streamed = load_model(out)
    full = open_model(folder)
    mem_cfg, mem = dj.prune.prune_mlp(full.cfg, full.load(), hidden=32)
    assert streamed_cfg == mem_cfg and mem_cfg.mlp_hidden == (32, 32)
    a, b = flatten(streamed), flatten(mem)
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    slim = transformers.Dinov2Model(transformers.Dinov2Config(**{**MODELS["Dinov2Model"][2], "mlp_ratio": 1}))
    sd = dj.convert.to_torch(mem_cfg, mem, "hf_dinov2")
    slim.save_pretrained(tmp_path / "slim")  # the Hub names of this class, to load the export under
    hub = set(dj.convert.load_state_dict(tmp_path / "slim" / "model.safetensors"))
    assert set(sd) == hub
    save_safetensors(tmp_path / "slim" / "model.safetensors", sd)
    assert_parity("Dinov2Model pruned", mem_cfg, mem, type(slim).from_pretrained(tmp_path / "slim").eval())


def test_teacher_and_explicit_flags_meet_a_config_json(tmp_path):
    """A recognized config.json wins over family=/arch= (the teacher's defaults); without one they are used; a
    config.json naming a class this tool does not read says so and what to pass."""
    from ml_collections import ConfigDict

    from dgmr_jax.train.run import open_teacher

    _, folder = saved("Dinov2WithRegistersModel", tmp_path)
    teacher = ConfigDict(dict(model_dir="", checkpoint=str(folder), family="timm", arch="vit_tiny_patch16_224"))
    assert open_teacher(teacher).cfg.reg_tokens == 2
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["Dinov2ForImageClassification"]}))
    with pytest.raises(dj.convert.CheckpointError, match="names 'Dinov2ForImageClassification' .* which is not read"):
        open_model(folder)
    (folder / "config.json").unlink()  # without a config.json, family= and arch= say it all
    with pytest.raises(dj.convert.CheckpointError, match="has no config.json naming its class: pass --family"):
        open_model(folder)
    small = dict(img_size=28, width=32, depth=2, num_heads=2, hidden=64, reg_tokens=2)
    cfg = dj.models.preset("vit_small_patch14_reg4_dinov2", **small)
    assert open_model(folder, family="hf_dinov2", arch=cfg).cfg.reg_tokens == 2


@pytest.mark.parametrize("name", ["InternViT-6B-448px-V2_5", "InternViT-300M-448px-V2_5"])
def test_internvit_config_json_gives_the_preset(name, tmp_path):
    """OpenGVLab's remote-code config.json (InternVisionModel, and an InternVLChatModel's vision_config) reads as
    the preset, without building anything."""
    big = name.startswith("InternViT-6B")
    vision = dict(
        architectures=["InternVisionModel"],
        model_type="intern_vit_6b",
        hidden_size=3200 if big else 1024,
        num_hidden_layers=45 if big else 24,
        num_attention_heads=25 if big else 16,
        intermediate_size=12800 if big else 4096,
        qkv_bias=not big,
        qk_normalization=big,
        norm_type="rms_norm" if big else "layer_norm",
        layer_norm_eps=1e-6,
        image_size=448,
        patch_size=14,
        hidden_act="gelu",
    )
    chat = dict(architectures=["InternVLChatModel"], model_type="internvl_chat", vision_config=vision)
    for i, config in enumerate([vision, chat]):
        folder = tmp_path / f"m{i}"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        family, cfg = hf_layout(str(folder / "model.safetensors.index.json"))
        assert family == "internvit" and cfg == dj.models.preset(name).replace(name=f"m{i}"), name


def test_a_sharded_index_that_lies_is_one_error(tmp_path):
    save_safetensors(tmp_path / "a.safetensors", {"x": np.ones(2, ml_dtypes.bfloat16)})
    (tmp_path / "m.index.json").write_text(json.dumps({"weight_map": {"x": "a.safetensors", "y": "a.safetensors"}}))
    sd = ShardedCheckpoint(str(tmp_path / "m.index.json"))
    assert sorted(sd) == ["x", "y"] and sd["x"].dtype == ml_dtypes.bfloat16
    with pytest.raises(dj.convert.CheckpointError, match="places y in .*a.safetensors, which does not hold it"):
        sd["y"]
    (tmp_path / "n.index.json").write_text(json.dumps({"weight_map": {"x": "gone.safetensors"}}))
    with pytest.raises(dj.convert.CheckpointError, match="names shards that are not there: .*gone.safetensors"):
        ShardedCheckpoint(str(tmp_path / "n.index.json"))


# transformers' CLIPModel as zero-shot and finetune-text's text tower: the real CLIP vocabulary (so the tokenizer
# files are the Hub's), 1 text layer
CLASSES_TEXT = ["cat", "Dog!", "a red car", "number 7", "it's a tree"]
TEXTS = ["a photo of a cat.", "Hello, World!!", "it's the dog's bone; they've 'quoted' ", "UPPER lower MiXeD"]
TEXTS += ["&amp; 1 < 2", "naïve café ＦＵＬＬ ﬁ “curly”", "<|startoftext|> in <|endoftext|>", "word " * 90, ""]


def clip_model_dir(root: Path, fmt: str, eos: int):
    """(CLIPModel of the real CLIP vocabulary and end-of-text id `eos` (2: transformers' legacy argmax pooling),
    its sharded directory in `fmt` with its tokenizer: vocab.json + merges.txt as the Hub's CLIP repos hold them,
    or (bin) the tokenizer.json transformers 5 saves)."""
    from dgmr_jax.models.tokenizer import EOT, HF_EOT, HF_SOT, SOT, Tokenizer

    text = dict(_TEXT, vocab_size=49408, bos_token_id=49406, eos_token_id=eos, pad_token_id=1)
    config = transformers.CLIPConfig(
        vision_config=dict(_VISION, intermediate_size=64), text_config=text, projection_dim=16
    )
    config._attn_implementation = "eager"
    model, folder = randomize(transformers.CLIPModel(config), 5), root / f"clip-{fmt}"
    model.save_pretrained(folder, max_shard_size=SHARD)
    if fmt == "bin":
        as_bin_shards(folder)
    ours = Tokenizer()  # the CLIP BPE open_clip ships: the Hub's vocab.json + merges.txt hold the same
    vocab = {{SOT: HF_SOT, EOT: HF_EOT}.get(t, t): i for t, i in ours.ids.items()}
    merges = "\n".join(" ".join(m) for m in sorted(ours.ranks, key=ours.ranks.get))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text(f"#version: 0.2\n{merges}\n")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
    if fmt == "bin":
        (folder / "vocab.json").unlink()
        (folder / "merges.txt").unlink()
        tokenizer.save_pretrained(folder)
    return model, folder, tokenizer


def text_features(model, ids: torch.Tensor) -> torch.Tensor:
    """CLIPModel.get_text_features (transformers 5 returns it as the output's pooler_output)."""
    with torch.no_grad():
        out = model.get_text_features(input_ids=ids)
    return getattr(out, "pooler_output", out)


@pytest.mark.parametrize("fmt,eos", [("safetensors", 49407), ("bin", 2)])
def test_clip_model_text_tower_and_zeroshot_logits_at_parity(fmt, eos, tmp_path):
    """open_text_tower reads a CLIPModel directory (sharded) with its own tokenizer: ids equal CLIPTokenizer's,
    text features equal get_text_features, zero-shot logits equal logits_per_image, with the same ranking."""
    pytest.importorskip("open_clip")
    from dgmr_jax.eval import encode_texts, zeroshot_accuracy, zeroshot_classifier
    from dgmr_jax.eval.knn import l2_normalize
    from dgmr_jax.io.clip import open_text_tower

    model, folder, hf_tokenizer = clip_model_dir(tmp_path, fmt, eos)
    vision = open_model(folder)
    text_cfg, text_params, tokenizer = open_text_tower(folder, vision.cfg)
    assert (text_cfg.name, text_cfg.eos_token, text_cfg.activation) == (
        folder.name,
        -1 if eos == 2 else eos,
        "quick_gelu",
    )
    ref = hf_tokenizer(TEXTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ids = tokenizer(TEXTS)
    mask = ref["attention_mask"].numpy().astype(bool)
    assert np.array_equal(ids[mask], ref["input_ids"].numpy()[mask]) and not ids[~mask].any()  # pads: 0, not EOT
    ours = encode_texts(text_cfg, text_params, ids, batch=5)  # compiled once, at the zero-shot prompts' shape
    err = rel_err(ours, text_features(model, ref["input_ids"]))
    print(f"PARITY CLIPModel text ({fmt}) rel_err={err:.2e}")
    assert err <= TOL

    x = images(28, batch=6)
    prompts = [f"a photo of a {c}." for c in CLASSES_TEXT]
    with torch.no_grad():
        hf_ids = hf_tokenizer(prompts, padding=True, return_tensors="pt")["input_ids"]
        logits_ref = model(input_ids=hf_ids, pixel_values=x).logits_per_image.numpy()
    classifier = zeroshot_classifier(text_cfg, text_params, CLASSES_TEXT, ["a photo of a {}."], tokenizer)
    img = jax.jit(dj.models.forward, static_argnums=0)(vision.cfg, vision.load(), to_nhwc(x))["pooled"]
    logits = np.exp(float(text_params["logit_scale"])) * np.asarray(l2_normalize(np.asarray(img))) @ classifier
    assert rel_err(logits, logits_ref) <= TOL, rel_err(logits, logits_ref)
    assert np.array_equal(np.argsort(-logits, axis=1), np.argsort(-logits_ref, axis=1))
    labels = np.array([0, 1, 2, 3, 4, 0])
    top1 = float(np.mean(logits_ref.argmax(1) == labels))
    assert zeroshot_accuracy(img, labels, classifier, ks=(1,)) == {1: top1}


def test_clip_model_text_pooling_export_and_refusals(tmp_path):
    """transformers' pooling rules (the first eos_token_id; the argmax of the ids for the legacy eos_token_id 2) on
    ids where they differ; the text tower exports back to transformers' names bit for bit; a tokenizer that does not
    fit the tower, and a directory without a text tower, are one-line errors."""
    from dgmr_jax.io.clip import open_text_tower
    from dgmr_jax.io.hf_config import hf_text_config
    from dgmr_jax.io.text_convert import text_layout

    model, folder = saved("CLIPModel", tmp_path)  # vocab 99, eos_token_id 1: not the largest id
    layout, cfg = hf_text_config(str(folder))
    cfg, params = dj.convert.text_from_torch(folder, cfg)
    ids = np.array([[0, 5, 98, 1, 1, 1], [0, 97, 3, 1, 1, 1]])
    first = text_features(model, torch.from_numpy(ids))
    model.text_model.eos_token_id = 2
    argmax = text_features(model, torch.from_numpy(ids))
    assert (layout, cfg.eos_token) == ("hf_clip", 1)
    assert rel_err(first, argmax) > 0.1  # the rules pool different positions here
    assert rel_err(dj.models.encode_text(cfg, params, ids), first) <= TOL
    assert rel_err(dj.models.encode_text(cfg.replace(eos_token=-1), params, ids), argmax) <= TOL

    back = dj.convert.text_to_torch(cfg, params, layout="hf_clip")
    assert text_layout(back) == ("hf_clip", "")  # told by the keys: text_model.* without SigLIP's head
    theirs = {k: v.numpy() for k, v in model.state_dict().items() if not k.startswith(("vision_model.", "visual_"))}
    assert sorted(back) == sorted(theirs) and all(np.array_equal(back[k], v) for k, v in theirs.items())
    with pytest.raises(ValueError, match="unknown text tower layout 'hf'; known: open_clip, hf_clip, hf_siglip"):
        dj.convert.text_to_torch(cfg, params, layout="hf")

    vision = open_model(folder).cfg
    with pytest.raises(ValueError) as err:  # no tokenizer files: the built-in CLIP BPE's 49408 ids do not fit
        open_text_tower(folder, vision)
    assert str(err.value) == (
        f"the tokenizer (49408 ids, end of text 49407) does not fit text tower '{folder.name}' (vocab_size 99, "
        "pooled at 1): give its vocabulary with --bpe-vocab (a bpe_simple_vocab_16e6.txt.gz, or a transformers "
        "directory with vocab.json + merges.txt)"
    )
    with pytest.raises(ValueError) as err:  # the config.json gives the tower: an open_clip preset is refused
        open_text_tower(folder, vision, text_arch="ViT-B-32")
    assert str(err.value) == (
        f"{folder} is a CLIPModel directory, whose config.json gives the text tower: drop --text-arch (it is for "
        "open_clip checkpoints)"
    )
    vision_only = tmp_path / "vision-only"  # weights and a config.json naming a class without a text tower
    vision_only.mkdir()
    (vision_only / "config.json").write_text(json.dumps({"architectures": ["CLIPVisionModelWithProjection"]}))
    save_safetensors(vision_only / "model.safetensors", {"w": np.zeros(2, np.float32)})
    with pytest.raises(ValueError) as err:
        open_text_tower(vision_only, vision)
    assert str(err.value) == (
        f"{vision_only / 'config.json'} names 'CLIPVisionModelWithProjection', which holds no text tower read here: "
        "give a transformers CLIPModel / SiglipModel / Siglip2Model directory or an open_clip / EVA-CLIP checkpoint"
    )


@pytest.mark.slow
def test_eval_zeroshot_with_a_clip_model_directory_through_the_cli(tmp_path):
    """A user's `dgmr-jax eval --model DIR --clip-text DIR --zeroshot`: both towers and the tokenizer from one
    CLIPModel directory; top-1 equals transformers' logits_per_image on the same preprocessed images."""
    pytest.importorskip("open_clip")

    from dgmr_jax.data import EvalBatches, ImageFolderSource
    from dgmr_jax.models.preprocess import CLIP_MEAN, CLIP_STD, Preprocess

    model, folder, hf_tokenizer = clip_model_dir(tmp_path, "safetensors", 49407)
    processor = dict(image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), resample=3, do_center_crop=True)
    (folder / "preprocessor_config.json").write_text(json.dumps(processor | dict(size=32, crop_size=28)))
    names = ["cat", "red_car", "tree"]
    class_png_folders(tmp_path / "test", names, shape=(34, 30), std=50)
    out = tmp_path / "result.json"
    argv = ["eval", "--model", str(folder), "--clip-text", str(folder), "--zeroshot", "--train", "none"]
    argv += ["--test", str(tmp_path / "test"), "--out", str(out)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-m", "dgmr_jax.cli", *argv], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]

    source = ImageFolderSource(tmp_path / "test")
    view = Preprocess.from_meta(open_model(folder).meta, folder.name).eval_view(28)
    x = torch.from_numpy(next(iter(EvalBatches(source, batch_size=9, img_size=28, **view)))["images"])
    prompts = [f"a photo of a {n.replace('_', ' ')}." for n in names]
    with torch.no_grad():
        ids = hf_tokenizer(prompts, padding=True, return_tensors="pt")["input_ids"]
        logits = model(input_ids=ids, pixel_values=x.permute(0, 3, 1, 2)).logits_per_image
    top1 = (logits.argmax(1) == torch.arange(3).repeat_interleave(3)).sum().item() / 9
    result = json.loads(out.read_text())
    assert (result["text_arch"], result["zeroshot"], result["classes"]) == (
        folder.name,
        {"top1": top1, "templates": 1},
        3,
    )
    assert f"zero-shot top1 {top1:.4f} (9 images, 3 classes)" in run.stdout


def test_finetune_text_reads_and_exports_a_clip_model_text_tower(tmp_path):
    """finetune-text's inputs from a CLIPModel directory (its config, its own tokenizer, the text_model.* weights)
    and its export: text.safetensors in transformers' names, which CLIPModel loads to the same text features, and no
    merged open_clip state dict."""
    pytest.importorskip("open_clip")
    from etils import epath
    from PIL import Image

    from dgmr_jax.io.checkpoint_io import load_state_dict
    from dgmr_jax.text_stage.defaults import text_config
    from dgmr_jax.text_stage.finetune import _export, open_inputs

    model, folder, hf_tokenizer = clip_model_dir(tmp_path, "safetensors", 49407)
    (tmp_path / "pairs").mkdir()
    for i in range(2):
        Image.fromarray(np.full((28, 28, 3), 90 * i, np.uint8)).save(tmp_path / "pairs" / f"{i}.png")
        (tmp_path / "pairs" / f"{i}.txt").write_text(f"An image, number {i}!")
    config, workdir = text_config(), epath.Path(tmp_path / "run")
    config.compile_cache = ""
    inputs = open_inputs(config, workdir, str(folder), str(folder), str(tmp_path / "pairs"), None, None, None)
    assert (inputs.layout, inputs.prefix, inputs.text_cfg.name) == ("hf_clip", "", folder.name)
    ids = hf_tokenizer(TEXTS[:4], padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    tokens = inputs.tokenizer(TEXTS[:4])
    assert np.array_equal(np.where(tokens == 0, 49407, tokens), ids.numpy())  # transformers pads with EOT

    out = _export(workdir, inputs.text_cfg, inputs.text_params, inputs, None, {"step": 0})
    assert sorted(os.listdir(out)) == ["export.json", "text.safetensors", "text_config.json"]
    assert json.loads((out / "export.json").read_text())["layout"] == "hf_clip"
    fresh = transformers.CLIPModel(model.config)
    text_sd = {k: torch.from_numpy(v) for k, v in load_state_dict(out / "text.safetensors").items()}
    missing, unexpected = fresh.load_state_dict(text_sd, strict=False)
    assert not unexpected and all(k.startswith(("vision_model.", "visual_projection")) for k in missing), missing
    assert torch.equal(text_features(fresh.eval(), ids), text_features(model, ids))
