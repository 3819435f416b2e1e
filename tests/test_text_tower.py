"""CLIP text tower: presets equal open_clip's configs, encode_text equals open_clip's, conversion is strict and
exact, the BPE tokenizer equals open_clip.tokenize."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from reference import rel_err, small_clip, torch

import dgmr_jax as dj
from dgmr_jax.convert import CheckpointError, text_from_torch, text_to_torch
from dgmr_jax.models.tokenizer import Tokenizer

open_clip = pytest.importorskip("open_clip")

TEXTS = [
    "a photo of a cat.",
    "Hello, World!!",
    "",
    "   ",
    "it's the dog's bone; they've 'quoted' ",
    "3.14159 and 2,000,000 items #1",
    "naïve café résumé",
    "日本語のテキスト",
    "emoji 😀🎉 test",
    "&amp; &lt;b&gt;bold&lt;/b&gt; &amp;amp;",
    "Tabs\tand\nnewlines\r\n here",
    "ＦＵＬＬＷＩＤＴＨ text",
    "â€œmojibakeâ€\x9d",
    "<start_of_text> inside <END_OF_TEXT>",
    "x" * 300,
    "word " * 100,
    "UPPER lower MiXeD",
    "e-mail: foo@bar.com http://example.org/path?q=1",
    "½ ² ³ ٣ numbers",
    "Ελληνικά και русский",
    "aaaaa" + "🙂" * 40,
    "don't won't can't I'm you'll he'd",
    "---!!!???...",
    "a photo of the number 7.",
    "ﬁ ligature",
    "\u200bzero\u200bwidth",
    "C++ & C#",
    "l'été",
    "A",
    "a photo of a {}.",
]


def _model_configs() -> str:
    return os.path.join(os.path.dirname(importlib.util.find_spec("open_clip").origin), "model_configs")


@pytest.mark.parametrize("name", sorted(dj.models.TEXT_PRESETS))
def test_text_presets_equal_open_clip_configs(name):
    with open(os.path.join(_model_configs(), f"{name}.json")) as f:
        ref = json.load(f)
    text = ref["text_cfg"]
    # every text option of the json is one TextConfig models; anything else would be a variant we ignore
    assert set(text) <= {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}, set(text)
    ours = dj.models.resolve_text_config(name)
    expected = dict(
        name=name,
        vocab_size=text["vocab_size"],
        context_length=text["context_length"],
        width=text["width"],
        heads=text["heads"],
        layers=text["layers"],
        mlp_ratio=text.get("mlp_ratio", 4.0),
        embed_dim=ref["embed_dim"],
        activation="quick_gelu" if ref.get("quick_gelu") else "gelu",
    )
    assert {k: getattr(ours, k) for k in expected} == expected


def test_every_open_clip_vision_preset_has_its_text_tower():
    clip_archs = {name for name, fields in dj.models.PRESETS.items() if fields.get("proj_dim")}
    assert clip_archs == {"ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-g-14", "ViT-bigG-14"}
    assert clip_archs <= set(dj.models.TEXT_PRESETS)


def _text_entries(model) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in model.state_dict().items() if not k.startswith("visual.")}


@pytest.mark.parametrize("activation,custom_text", [("gelu", False), ("quick_gelu", False), ("gelu", True)])
@pytest.mark.slow
def test_encode_text_equals_open_clip_and_round_trips(activation, custom_text):
    model, _, text_cfg = small_clip(activation, custom_text)
    cfg, params = text_from_torch(model.state_dict(), text_cfg)
    tokens = open_clip.tokenize(TEXTS)
    with torch.no_grad():
        ref = model.encode_text(tokens)
    out = dj.models.encode_text(cfg, params, tokens.numpy())
    assert out.shape == (len(TEXTS), 32)
    assert rel_err(out, ref) <= 1e-5, rel_err(out, ref)
    other = cfg.replace(activation="gelu" if activation == "quick_gelu" else "quick_gelu")
    assert rel_err(dj.models.encode_text(other, params, tokens.numpy()), ref) > 1e-3  # the activation is seen
    # causal attention: positions after EOT do not change the embedding, so a shorter context gives the same
    assert rel_err(dj.models.encode_text(cfg, params, tokens.numpy()[:3, :20]), ref[:3]) <= 1e-5
    back = text_to_torch(cfg, params, prefix="text." if custom_text else "")
    sd = _text_entries(model)
    assert sorted(back) == sorted(sd)
    assert all(back[k].dtype == v.dtype and np.array_equal(back[k], v) for k, v in sd.items())


@pytest.mark.slow
def test_bfloat16_checkpoint_round_trips_bit_exact_and_encodes_in_float32():
    model, _, text_cfg = small_clip()
    bf16 = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    cfg, params = text_from_torch(bf16, text_cfg)
    assert params["token_embed"].dtype.name == "bfloat16"
    back = text_to_torch(cfg, params)
    for k, v in bf16.items():
        if not k.startswith("visual."):
            assert np.array_equal(back[k].view(np.int16), v.view(torch.int16).numpy()), k
    tokens = open_clip.tokenize(TEXTS[:4])
    with torch.no_grad():
        ref = model.float().encode_text(tokens)  # the float32 model: bf16 weights round to ~3 digits
    out = dj.models.encode_text(cfg, params, tokens.numpy())
    assert out.dtype == np.float32 and rel_err(out, ref) < 0.05


def test_text_conversion_is_strict():
    model, _, text_cfg = small_clip()
    sd = dict(model.state_dict())
    sd["attn_mask"] = torch.zeros(77, 77)  # derived buffer: ignored, as is everything under visual.
    text_from_torch(sd, text_cfg)

    broken = {k: v for k, v in sd.items() if k != "transformer.resblocks.1.mlp.c_fc.weight"}
    broken["transformer.resblocks.1.mlp.c_fc.weght"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        text_from_torch(broken, text_cfg)
    message = str(err.value)
    assert "1 missing keys: transformer.resblocks.1.mlp.c_fc.weight" in message
    assert "1 unexpected keys: transformer.resblocks.1.mlp.c_fc.weght" in message

    with pytest.raises(CheckpointError, match=r"text_projection \(64, 32\) -> proj/kernel expects \(64, 16\)"):
        text_from_torch(sd, text_cfg.replace(embed_dim=16))
    with pytest.raises(CheckpointError, match=r"unexpected keys: transformer\.resblocks\.1\.attn\.in_proj_bias"):
        text_from_torch(sd, text_cfg.replace(layers=1))
    vision_only = {k: v for k, v in sd.items() if k.startswith("visual.")}
    with pytest.raises(CheckpointError, match="holds no CLIP text tower"):
        text_from_torch(vision_only, text_cfg)
    with pytest.raises(ValueError, match="unknown text tower 'ViT-X'"):
        text_from_torch(sd, "ViT-X")

    cfg, params = text_from_torch(sd, text_cfg)
    del params["blocks_0"]["mlp"]["fc2"]
    with pytest.raises(CheckpointError, match="params missing: blocks_0/mlp/fc2/bias, blocks_0/mlp/fc2/kernel"):
        text_to_torch(cfg, params)


def test_text_config_json_round_trip(tmp_path):
    cfg = dj.models.resolve_text_config("EVA02-E-14-plus")
    path = tmp_path / "text.json"
    path.write_text(cfg.replace(layers=3).to_json())
    assert dj.models.resolve_text_config(str(path)) == cfg.replace(layers=3)
    path.write_text(json.dumps({"widht": 3}))
    with pytest.raises(ValueError, match="unknown TextConfig fields"):
        dj.models.resolve_text_config(str(path))
    with pytest.raises(ValueError, match="not divisible by heads"):
        cfg.replace(heads=7)


def test_tokenizer_equals_open_clip_tokenize():
    tok = Tokenizer()
    ours = tok(TEXTS)
    assert ours.dtype == np.int32 and ours.shape == (len(TEXTS), 77)
    np.testing.assert_array_equal(ours, open_clip.tokenize(TEXTS).numpy())
    # truncation keeps EOT last, at any context length
    np.testing.assert_array_equal(tok(TEXTS, context_length=16), open_clip.tokenize(TEXTS, context_length=16).numpy())
    assert tok(["word " * 100])[0, -1] == tok.eot and tok("a")[0, :4].tolist() == [tok.sot, 320, tok.eot, 0]


def test_tokenizer_reads_the_vocabulary_without_importing_open_clip_or_torch():
    code = (
        "import sys; from dgmr_jax.models.tokenizer import Tokenizer; t = Tokenizer(); "
        "assert t('a photo')[0, :4].tolist() == [49406, 320, 1125, 49407]; "
        "print(sorted(m for m in ('open_clip', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_tokenizer_without_vocabulary_says_what_to_do(monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError, match="pip install open_clip_torch"):
        Tokenizer(tmp_path / "missing.txt.gz")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} holds no vocab.json \\+ merges.txt or tokenizer.json"):
        Tokenizer(tmp_path)  # a directory without a transformers tokenizer's files
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    with pytest.raises(ValueError) as err:
        Tokenizer(tmp_path)
    assert str(err.value) == f"{tmp_path}: not a CLIP tokenizer's vocabulary (no <|startoftext|> / <|endoftext|> in it)"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="open_clip_torch is not installed.*pass the file's path"):
        Tokenizer()
