"""SigLIP as a model family: the attention-pool (MAP) head, tanh GELU and no class token, converted from timm's
vit_*_siglip_* and from transformers' SiglipVisionModel / SiglipModel / Siglip2VisionModel (fixed resolution)
directories at parity (<= 1e-5, pooled and tokens); full-size presets counted like timm and transformers (on torch's
meta device); and through the CLI: convert a sharded directory with no --family/--arch, prune it (the head's MLP
stays whole), distil a tiny SigLIP student, export it as a PyTorch package. SiglipModel's text tower and tokenizer equal
transformers' (get_text_features, logits_per_image, SiglipTokenizer ids), and zero-shot runs on its directory; so do
Siglip2Model's, with Gemma's SentencePiece tokenizer (Siglip2Tokenizer ids)."""

from __future__ import annotations

import functools
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image
from reference import (
    assert_same_tree,
    class_png_folders,
    images,
    meta_state_dict,
    package_modeling,
    random_png_folder,
    randomize,
    rel_err,
    timm,
    to_nhwc,
    torch,
)
from reference_uvc import mixed_plan
from torch.utils.flop_counter import FlopCounterMode

import dgmr_jax as dj
from dgmr_jax.cli import main
from dgmr_jax.data import EvalBatches, ImageFolderSource
from dgmr_jax.data.loader import make_loader
from dgmr_jax.distill.loss import tap_config
from dgmr_jax.eval import encode_texts, image_text_scores
from dgmr_jax.io.checkpoint_io import save_safetensors
from dgmr_jax.io.clip import check_embedding, open_text_tower
from dgmr_jax.io.hf_config import hf_text_config, siglip_tokenizer
from dgmr_jax.io.hooks import HOOKS
from dgmr_jax.io.keymaps import export_families
from dgmr_jax.io.open import open_model
from dgmr_jax.io.source import InMemorySource
from dgmr_jax.io.text_convert import text_from_torch, text_layout, text_rules, text_to_torch
from dgmr_jax.io.torch_export import export_package
from dgmr_jax.model_dir import load_config, load_model, save_model
from dgmr_jax.models.preprocess import Preprocess, published
from dgmr_jax.models.slim import slice_units
from dgmr_jax.models.text import text_param_shapes
from dgmr_jax.models.tree import flatten, unflatten
from dgmr_jax.prune.taylor import hidden_and_grads

transformers = pytest.importorskip("transformers")

TOL = 1e-5
SHARD = "20KB"  # the 2-layer, 32-wide towers below are ~70 KB: several shards
CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "cpu_tiny.py")
_VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=14, intermediate_size=64)
_TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=99)
_TEXT |= dict(bos_token_id=0, eos_token_id=1, pad_token_id=1)
# SigLIP 2's text tower: Gemma's ids (pad 0, eos 1, bos 2), 16 positions so that a long prompt is cut
_TEXT2 = dict(_TEXT, vocab_size=330, max_position_embeddings=16, bos_token_id=2, pad_token_id=0)
# label -> (config class, config kwargs, family); every tower sees 28 px images as a 2 x 2 grid
MODELS = {
    "SiglipVisionModel": ("SiglipVisionConfig", dict(_VISION, image_size=28), "hf_siglip"),
    "SiglipModel": (
        "SiglipConfig",
        dict(vision_config=dict(_VISION, image_size=28), text_config=_TEXT),
        "hf_siglip",
    ),
    "Siglip2VisionModel": ("Siglip2VisionConfig", dict(_VISION, num_patches=4), "hf_siglip2"),
    "Siglip2Model": (
        "Siglip2Config",
        dict(vision_config=dict(_VISION, num_patches=4), text_config=_TEXT2),
        "hf_siglip2",
    ),
}
# exact parameter counts of the full presets (equal to timm's and transformers' own, see the count test)
COUNTS = {"base": 92_884_224, "so400m": 428_225_600}


def build(label: str, seed: int = 0, **changes):
    """The transformers model of `label` from its small config (vision sizes changed by `changes`), seeded."""
    config_cls, kwargs, _ = MODELS[label]
    if "vision_config" in kwargs:
        kwargs = dict(kwargs, vision_config={**kwargs["vision_config"], **changes})
    config = getattr(transformers, config_cls)(**{**kwargs, **({} if "vision_config" in kwargs else changes)})
    config._attn_implementation = "eager"
    return randomize(getattr(transformers, label)(config), seed)


def saved(label: str, root: Path, seed: int = 0):
    """(model, its sharded save_pretrained directory)."""
    model, folder = build(label, seed), root / label
    model.save_pretrained(folder, max_shard_size=SHARD)
    return model, folder


def tower(model):
    """The vision tower of a transformers model (SiglipModel's vision_model, else the model itself)."""
    return getattr(model, "vision_model", model)


def pixels(model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The image inputs of a transformers model for x (NCHW): pixel_values, or for a Siglip2 tower x as patches
    flattened (row, column, channel), all valid, at the grid's spatial shape."""
    vision = tower(model)
    if "Siglip2" not in type(vision).__name__:
        return {"pixel_values": x}
    b, c, h, w = x.shape
    p = vision.config.patch_size
    patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, p * p * c)
    mask = torch.ones(patches.shape[:2], dtype=torch.int32)
    return dict(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=torch.tensor([[h // p, w // p]] * b))


def reference_outputs(model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """transformers' tokens (last_hidden_state, after post_layernorm) and pooled vector (the head's output)."""
    with torch.no_grad():
        out = tower(model)(**pixels(model, x))
    return {"tokens": out.last_hidden_state, "pooled": out.pooler_output}


def assert_parity(label: str, cfg, params, want: dict[str, torch.Tensor], x: torch.Tensor) -> None:
    """Ours against `want` on x, <= TOL on every output; the errors are printed for the report."""
    ours = dj.models.forward(cfg, params, to_nhwc(x))
    for key, ref in want.items():
        err = float(np.abs(np.asarray(ours[key], np.float64) - ref.numpy()).max())
        print(f"PARITY {label:34s} {key:7s} max_abs={err:.2e}")
        assert err <= TOL, (label, key, err)


def noise(cfg, seed: int = 0):
    """Seeded noise params of cfg's shapes (numpy; no init is compiled)."""
    rng = np.random.default_rng(seed)
    shapes = flatten(dj.models.param_shapes(cfg))
    return unflatten({k: (0.1 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in shapes.items()})


def small_timm(seed: int = 0):
    """(timm vit_base_patch16_siglip_224 shrunk to 2 layers of width 64 at 32 px, seeded; matching ModelConfig)."""
    model = timm.create_model(
        "vit_base_patch16_siglip_224", pretrained=False, img_size=32, depth=2, embed_dim=64, num_heads=4
    )
    cfg = dj.models.preset("vit_base_patch16_siglip_224", img_size=32, depth=2, width=64, num_heads=4, hidden=256)
    return randomize(model, seed), cfg


def test_timm_parity_and_bit_exact_round_trip():
    """timm's erf-GELU siglip ViT: tokens after the final norm and the attention pool's output at parity; to_torch
    gives back every tensor bit for bit."""
    model, cfg = small_timm()
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    cfg, params = dj.convert.from_torch(sd, family="timm", arch=cfg)
    assert cfg.global_pool == "map" and not cfg.class_token and cfg.pool_hidden == 256 and cfg.mlp_type == "gelu"
    x = images(32)
    with torch.no_grad():
        tokens = model.forward_features(x)
        want = {"tokens": tokens, "pooled": model.forward_head(tokens, pre_logits=True)}
    assert_parity("timm vit_base_patch16_siglip_224", cfg, params, want, x)
    back = dj.convert.to_torch(cfg, params, "timm")
    assert sorted(back) == sorted(sd) and all(np.array_equal(back[k], sd[k]) for k in sd)
    assert dj.prune.count_params(cfg) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("label", sorted(set(MODELS) - {"Siglip2Model"}))  # its vision tower: Siglip2VisionModel's
def test_sharded_transformers_directory_opens_without_family_or_arch_at_parity(label, tmp_path):
    """A save_pretrained directory in several shards: config.json gives the family and the architecture (tanh GELU,
    the MAP head as wide as the blocks' MLP); tokens and pooled vector at parity; to_torch writes the tower's own
    state dict back bit for bit."""
    model, folder = saved(label, tmp_path)
    assert len([f for f in os.listdir(folder) if f.endswith(".safetensors")]) >= 3
    source = open_model(folder)
    cfg = source.cfg
    assert source.meta["family"] == MODELS[label][2] and cfg.name == label
    assert (cfg.img_size, cfg.patch_size, cfg.width, cfg.depth, cfg.mlp_hidden) == (28, 14, 32, 2, (64, 64))
    assert (cfg.global_pool, cfg.pool_hidden, cfg.mlp_type, cfg.class_token) == ("map", 64, "gelu_tanh", False)
    params = source.load()
    x = images(28)
    assert_parity(label, cfg, params, reference_outputs(model, x), x)
    if label == "SiglipVisionModel":  # at 42 px the 2 x 2 position grid is resized as transformers resizes it
        x42 = images(42)
        with torch.no_grad():
            out = model(pixel_values=x42, interpolate_pos_encoding=True)
        want = {"tokens": out.last_hidden_state, "pooled": out.pooler_output}
        assert_parity(f"{label} 42px", cfg, params, want, x42)
    want = {k: v.numpy() for k, v in tower(model).state_dict().items()}
    back = dj.convert.to_torch(cfg, params, source.meta["family"])
    assert sorted(back) == sorted(want) and all(np.array_equal(back[k], want[k]) for k in want)


@pytest.mark.parametrize(
    "preset, timm_name, vision, size",
    [
        ("siglip-base-patch16-224", "vit_base_patch16_siglip_224", {}, "base"),
        pytest.param(
            "siglip-so400m-patch14-384",
            "vit_so400m_patch14_siglip_384",
            dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16),
            "so400m",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_full_size_presets_count_like_timm_and_transformers(preset, timm_name, vision, size):
    """The presets hold timm's and transformers' tensors key for key (built on torch's meta device: nothing is
    allocated) with equal parameter counts; SigLIP 2's fixed-resolution so400m is the same tower."""
    ref, count = meta_state_dict(lambda: timm.create_model(timm_name, pretrained=False))
    assert_same_tree(dj.models.preset(timm_name), "timm", ref)
    image = dict(image_size=384, patch_size=14) if vision else {}
    hf, hf_count = meta_state_dict(
        lambda: transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**vision, **image))
    )
    cfg = dj.models.preset(preset)
    assert_same_tree(cfg, "hf_siglip", hf)
    print(f"PARAMS {preset}: ours {dj.prune.count_params(cfg):,} timm {count:,} transformers {hf_count:,}")
    assert dj.prune.count_params(cfg) == dj.prune.count_params(dj.models.preset(timm_name)) == count == hf_count
    assert count == COUNTS[size]
    if vision:  # the 384 px checkpoints' 27 x 27 grid of 14 px patches, and SigLIP 2's fixed-resolution tower
        assert cfg.grid == 27 and dj.models.preset("siglip2-so400m-patch14-384") == cfg.replace(
            name="siglip2-so400m-patch14-384"
        )


def test_the_head_is_counted_kept_out_of_taylor_and_validated():
    """count_flops includes the attention pool (q of the probe, k/v of every patch, attention, proj, its MLP);
    Taylor scoring sees the blocks' MLPs only; bad map settings and the raw tap fail in one line."""
    cfg = dj.models.preset("siglip-base-patch16-224", img_size=32, depth=2, width=64, num_heads=4, hidden=256)
    d, n = 64, 4
    pool = d * d + n * d * 2 * d + 2 * n * d + d * d + 2 * d * 256
    assert dj.prune.count_flops(cfg, per_layer=True)["head"] == 2 * pool
    assert dj.prune.count_flops(cfg.replace(pool_hidden=128), per_layer=True)["head"] == 2 * (pool - d * 256)
    images_shape = jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32)  # traced abstractly: nothing is compiled
    pairs = jax.eval_shape(functools.partial(hidden_and_grads, cfg), dj.models.param_shapes(cfg), images_shape)
    assert sorted(pairs) == ["blocks_0", "blocks_1"]
    with pytest.raises(ValueError, match="global_pool='map' .* takes a plain MLP"):
        cfg.replace(mlp_type="swiglu")
    with pytest.raises(ValueError, match="global_pool must be one of .*'map'"):
        cfg.replace(global_pool="max")
    with pytest.raises(ValueError, match="tap 'raw' distils the raw class token, and model siglip-base-patch16-224"):
        tap_config(cfg, "raw")


def _cli(*argv: str) -> subprocess.CompletedProcess:
    """`dgmr-jax ARGV` in a subprocess, as a user runs it (CPU)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "dgmr_jax.cli", *argv], capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(transformers SiglipVisionModel, its sharded directory with SigLIP's image processor, the model directory
    `dgmr-jax convert --checkpoint DIR` wrote from it, with no --family or --arch, and that run)."""
    root = tmp_path_factory.mktemp("siglip")
    model, folder = saved("SiglipVisionModel", root)
    processor = dict(
        image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=3, do_resize=True, size=dict(height=28, width=28)
    )
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    run = _cli("convert", "--checkpoint", str(folder), "--out", str(root / "model"))
    return model, folder, root / "model", run


@pytest.mark.slow
def test_convert_a_sharded_directory_through_the_cli(converted):
    model, folder, out, run = converted
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith(f"wrote {out}: {folder.name}, ")
    assert run.stdout.endswith(
        "preprocess mean (0.5, 0.5, 0.5), std (0.5, 0.5, 0.5), crop_pct 1.0, bicubic, resized to a square (no crop)\n"
    )
    meta = load_config(out)[1]
    assert meta["preprocess"]["resize"] == "square"
    cfg, params = load_model(out)
    assert meta["family"] == "hf_siglip" and cfg.global_pool == "map"
    x = images(28)
    assert_parity("SiglipVisionModel (cli)", cfg, params, reference_outputs(model, x), x)


@pytest.mark.slow
def test_prune_through_the_cli_keeps_the_head_and_loads_into_transformers(converted, tmp_path):
    """`prune --checkpoint DIR` slims every block's MLP (64 -> 32) and leaves the attention pool's MLP at 64: the
    result equals prune_mlp in memory, and its hf_siglip export loads strictly into a SiglipVisionModel of
    intermediate_size 32 whose head MLP is rebuilt at 64 (transformers sizes both alike), computing the same."""
    _, folder, _, _ = converted
    out = tmp_path / "pruned"
    run = _cli("prune", "--checkpoint", str(folder), "--hidden", "32", "--out", str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    cfg, pruned = load_model(out)
    assert cfg.mlp_hidden == (32, 32) and cfg.pool_hidden == 64
    full = open_model(folder)
    mem_cfg, mem = dj.prune.prune_mlp(full.cfg, full.load(), hidden=32)
    assert mem_cfg == cfg
    a, b, original = flatten(pruned), flatten(mem), flatten(full.load())
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert all(np.array_equal(a[k], original[k]) for k in original if k.startswith("attn_pool/"))
    assert dj.prune.count_params(cfg) == sum(v.size for v in a.values())

    slim = build("SiglipVisionModel", seed=9, intermediate_size=32)
    wide = transformers.SiglipVisionConfig(**MODELS["SiglipVisionModel"][1])
    slim.head.mlp = transformers.models.siglip.modeling_siglip.SiglipMLP(wide)
    sd = dj.convert.to_torch(cfg, pruned, "hf_siglip")
    slim.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    x = images(28)
    assert_parity("SiglipVisionModel pruned", cfg, pruned, reference_outputs(slim.eval(), x), x)


def _check_package(what: str, package: Path, cfg, params, x) -> None:
    """The torch package in `package` computes our forward (assert_parity), and FlopCounterMode and its parameter
    count equal count_flops and count_params."""
    module = package_modeling(package).load(package)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        got = module.outputs(x)
    assert_parity(what, cfg, params, got, x)
    assert counter.get_total_flops() == x.shape[0] * dj.prune.count_flops(cfg)
    assert sum(p.numel() for p in module.parameters()) == dj.prune.count_params(cfg)


@pytest.mark.slow
def test_distil_a_tiny_siglip_student_through_the_cli_and_export_it_to_torch(converted, tmp_path):
    """A few CPU distillation steps with the converted SigLIP as teacher and its pruned copy as student (tap
    "output": the pooled MAP output and every token): the head is trained with the blocks; `export --format torch`
    writes a package whose modeling.py computes the student (<= 1e-5) at count_flops' FLOPs; tap "raw" is refused
    in one line before anything is written."""
    _, _, teacher, _ = converted
    (tmp_path / "imgs").mkdir()
    data = random_png_folder(tmp_path / "imgs")
    work = tmp_path / "run"
    argv = ["distill", "--config", CONFIG, "--workdir", str(work), f"--config.data.path={data}"]
    argv += [f"--config.teacher.model_dir={teacher}", "--config.student.mlp_ratio=1.0"]
    refused = _cli(*argv[:4], str(tmp_path / "never"), *argv[5:], "--config.distill.tap=raw")
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1] == (
        "dgmr-jax distill: error: tap 'raw' distils the raw class token, and model SiglipVisionModel has none "
        "(global_pool='map'); use tap 'output' (its pooled vector and final-norm tokens)"
    )
    assert not (tmp_path / "never").exists()
    run = _cli(*argv, "--config.optim.total_steps=4", "--config.checkpoint_every=4")
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4] and all(
        np.isfinite(r["loss"]) for r in rows if "loss" in r
    )
    cfg, student = load_model(work / "model")
    _, start = load_model(teacher)
    assert cfg.mlp_hidden == (32, 32) and cfg.pool_hidden == 64 and cfg.global_pool == "map"
    trained, before = flatten(student), flatten(start)
    assert not np.array_equal(trained["attn_pool/fc1/kernel"], before["attn_pool/fc1/kernel"])

    package = tmp_path / "pkg"
    run = _cli("export", "--model", str(work / "model"), "--format", "torch", "--out", str(package))
    assert run.returncode == 0, run.stderr[-2000:]
    _check_package("SigLIP student (torch package)", package, cfg, student, images(28))


def test_a_siglip_model_exports_to_the_siglip_layouts_only():
    """timm's and transformers' SigLIP layouts hold a SigLIP model; another family's refusal names them."""
    cfg = dj.models.preset("siglip-base-patch16-224", img_size=32, depth=2, width=64, num_heads=4, hidden=256)
    assert export_families(cfg) == ["timm", "hf_siglip", "hf_siglip2"]
    with pytest.raises(dj.convert.CheckpointError) as err:
        dj.convert.to_torch(cfg, noise(cfg), "open_clip")
    assert str(err.value) == (
        "model siglip-base-patch16-224 cannot be written in the open_clip layout: it has a patch-embedding bias, no "
        "class token, an attention pool (global_pool='map'), tanh-approximate GELU, which open_clip's PyTorch model "
        "cannot hold; it exports as timm, hf_siglip, hf_siglip2 (--family timm)"
    )
    vit = dj.models.preset("vit_tiny_patch16_224", depth=1)
    with pytest.raises(dj.convert.CheckpointError, match="in the hf_siglip layout: it has a class token, "):
        dj.convert.to_torch(vit, noise(vit), "hf_siglip")


def test_siglip_eval_view_resizes_to_a_square_without_cropping():
    """SigLIP's published view, like its image processor: a 20 x 40 image is resized straight to 28 x 28 (bicubic,
    nothing cropped) then (x - 0.5) / 0.5, in EvalBatches and in make_loader's eval transform alike; the setting
    travels in meta, and crop_pct with it is refused in one line."""
    pre = published("siglip-so400m-patch14-384")
    assert pre == Preprocess((0.5,) * 3, (0.5,) * 3, resize="square")
    assert Preprocess.from_meta({"preprocess": pre.to_meta(378)}) == pre
    assert "resize" not in published("vit_so400m_patch14_siglip_384").to_meta(378)  # timm's: crop_pct 0.9
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (20, 40, 3), dtype=np.uint8))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    want = (np.asarray(image.resize((28, 28), Image.Resampling.BICUBIC), np.float32) / 255 - 0.5) / 0.5
    view = dict(img_size=28, **pre.eval_view(28))
    batch = next(iter(EvalBatches([buf.getvalue()], batch_size=1, **view)))
    np.testing.assert_allclose(batch["images"][0], want, atol=1e-6)
    loaded = next(iter(make_loader([buf.getvalue()], batch_size=1, train=False, num_epochs=1, **view)))
    np.testing.assert_array_equal(loaded["images"], batch["images"])
    cropped = next(iter(EvalBatches([buf.getvalue()], batch_size=1, **dict(view, square=False))))
    assert not np.allclose(cropped["images"], batch["images"], atol=1e-2)
    with pytest.raises(ValueError, match="resize 'square' crops nothing, so crop_pct must be 1, got 0.9"):
        pre.replace(crop_pct=0.9)


@pytest.mark.slow
def test_uvc_slim_siglip_keeps_its_head_through_surgery_and_both_exports(tmp_path):
    """A UVC slim SigLIP (a head dropped, an attention and an MLP branch removed, a block skipped, narrowed values)
    keeps the attention pool whole: the timm layout's padded export reads back bit for bit, and the PyTorch
    package computes the slim model (<= 1e-5) at count_flops' FLOPs with count_params' parameters."""
    cfg = dj.models.preset("siglip-base-patch16-224", img_size=32, depth=5, width=64, num_heads=4, hidden=128)
    params = noise(cfg)
    noisy = flatten(params)
    slim_cfg, slim, _ = slice_units(cfg, params, mixed_plan(cfg))
    assert slim_cfg.depth == 4 and slim_cfg.pool_hidden == 128 and not slim_cfg.full_units
    flat = flatten(slim)
    assert all(np.array_equal(flat[k], v) for k, v in noisy.items() if k.startswith("attn_pool/"))
    back_cfg, back = dj.convert.from_torch(dj.convert.to_torch(slim_cfg, slim, "timm"), family="timm", arch=slim_cfg)
    assert back_cfg == slim_cfg and all(np.array_equal(flatten(back)[k], v) for k, v in flat.items())
    export_package(InMemorySource(slim_cfg, slim), tmp_path / "pkg")
    _check_package("SigLIP UVC slim (torch package)", tmp_path / "pkg", slim_cfg, slim, images(32))


@pytest.mark.parametrize(
    "config, message",
    [
        (
            dict(architectures=["SiglipVisionModel"], vision_use_head=False),
            "config.json sets vision_use_head=false (a SigLIP tower without its attention-pool head), which is not "
            "read: the pooled vector is the head's output; convert a checkpoint that has the head",
        ),
        (
            dict(architectures=["Siglip2Model"], vision_config=dict(num_patches=250)),
            "config.json's num_patches 250 is not a square grid, which is not read",
        ),
    ],
)
def test_unread_siglip_configs_stop_in_one_line(tmp_path, capsys, config, message):
    """A headless SigLIP tower and a Siglip2 grid that is not square are refused before anything is written."""
    folder = tmp_path / "hub"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    save_safetensors(folder / "model.safetensors", {"w": np.zeros(2, np.float32)})
    assert main(["convert", "--checkpoint", str(folder), "--out", str(tmp_path / "never")]) == 2
    assert capsys.readouterr().err == f"dgmr-jax convert: error: {message}\n"
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_export_to_transformers_loads_strictly_and_a_pruned_head_is_refused(converted, tmp_path, capsys):
    """`export --format transformers` of the converted SigLIP: SiglipVisionModel.from_pretrained loads it with no
    missing or unexpected keys, computes what our model computes, and the image processor resizes to the square.
    A model whose blocks are pruned but whose head is not has no SiglipVisionConfig: one line, nothing written."""
    _, _, model_dir, _ = converted
    out = tmp_path / "hf"
    assert main(["export", "--model", str(model_dir), "--format", "transformers", "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out}: config.json (SiglipVisionModel), preprocessor_config")
    model, info = transformers.SiglipVisionModel.from_pretrained(out, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}, info
    cfg, params = load_model(model_dir)
    x = images(28)
    assert_parity("SiglipVisionModel (export)", cfg, params, reference_outputs(model.eval(), x), x)
    pixels = transformers.AutoImageProcessor.from_pretrained(out)(np.zeros((40, 30, 3), np.uint8))["pixel_values"]
    assert np.asarray(pixels).shape == (1, 3, 28, 28)
    capsys.readouterr()  # transformers' loading bars

    pruned_cfg, pruned = dj.prune.prune_mlp(cfg, params, hidden=32)
    save_model(tmp_path / "pruned", pruned_cfg, pruned, family="hf_siglip")
    refused = tmp_path / "refused"
    assert main(["export", "--model", str(tmp_path / "pruned"), "--format", "transformers", "--out", str(refused)]) == 2
    assert capsys.readouterr().err == (
        f"dgmr-jax export: error: model {pruned_cfg.name} (family hf_siglip) cannot be written as transformers' "
        "SiglipVisionModel: its SiglipVisionConfig gives the attention-pool head's MLP the blocks' width, and this "
        "model's head keeps 64 against blocks of 32; export it with --format torch\n"
    )
    assert not refused.exists()


# a few sentences SentencePiece learns a tiny unigram vocabulary from (ids 0-2: pad, eos, unk, as SigLIP's T5 model)
_CORPUS = [
    "a photo of a cat.",
    "a photo of a dog!",
    "the number seven, written by hand",
    "a bad photo of the digit",
    "zero one two three four five six seven eight nine",
    "an origami plane; a sketch of a bird",
]
PROMPTS = ["a photo of a cat.", "  A   PHOTO of\tthe   Digit nine!!", "héllo wörld", "", "photo " * 80]
SIGLIP_CLASSES, SIGLIP_TEMPLATES = ["cat", "dog", "red car"], ["a photo of a {}.", "The {}, again!"]


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    """(SiglipModel, its sharded directory with a SentencePiece spiece.model trained here and SigLIP's image
    processor, class folders of 40 x 36 images, the templates file)."""
    spm = pytest.importorskip("sentencepiece")
    root = tmp_path_factory.mktemp("siglip_text")
    model, folder = saved("SiglipModel", root)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 3),
        model_prefix=str(folder / "spiece"),
        vocab_size=60,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    (folder / "spiece.vocab").unlink()
    processor = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=3, size=dict(height=28, width=28))
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    class_png_folders(root / "test", SIGLIP_CLASSES)
    (root / "templates.txt").write_text("\n".join(SIGLIP_TEMPLATES) + "\n")
    return model, folder, root / "test", root / "templates.txt"


def test_siglip_text_tower_and_tokenizer_equal_transformers(siglip_dir):
    """A SiglipModel directory's text tower, read by open_text_tower: its token ids equal transformers'
    SiglipTokenizer (padding to 64, truncation keeping EOS), get_text_features and logits_per_image agree <= 1e-5
    (sigmoid probabilities, not softmax), and text_to_torch gives the text entries back bit for bit."""
    model, folder, _, _ = siglip_dir
    source = open_model(folder)
    text_cfg, text, tokenizer = open_text_tower(folder, source.cfg)
    assert (text_cfg.causal, text_cfg.pool, text_cfg.proj_bias, text_cfg.scoring) == (False, "last", True, "sigmoid")
    assert (text_cfg.context_length, text_cfg.mlp_hidden, text_cfg.activation) == (64, 64, "gelu_tanh")
    ref_tokenizer = transformers.SiglipTokenizer.from_pretrained(folder)
    want = ref_tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=64)["input_ids"]
    tokens = tokenizer(PROMPTS, context_length=64)
    assert tokens.tolist() == want and tokens[-1, -1] == 1 and len(set(tokens[0])) > 3

    ids, x = torch.from_numpy(tokens.astype(np.int64)), images(28, batch=3)
    with torch.no_grad():
        ref_text = model.get_text_features(input_ids=ids).pooler_output
        ref_logits = model(input_ids=ids, pixel_values=x).logits_per_image
    ours = encode_texts(text_cfg, text, tokens)  # jitted: one compilation, not one per op
    err = float(np.abs(np.asarray(ours, np.float64) - ref_text.numpy()).max())
    print(f"PARITY SiglipModel text features max_abs={err:.2e}")
    assert err <= TOL
    image_emb = jax.jit(lambda p, x: dj.models.forward(source.cfg, p, x)["pooled"])(source.load(), to_nhwc(x))
    logits, probs = image_text_scores(text_cfg, text, image_emb, ours)
    err = float(np.abs(logits - ref_logits.numpy()).max())
    print(f"PARITY SiglipModel logits_per_image max_abs={err:.2e}")
    assert err <= TOL and np.array_equal(logits.argsort(1), ref_logits.numpy().argsort(1))
    np.testing.assert_allclose(probs, torch.sigmoid(ref_logits).numpy(), atol=TOL)

    sd = {k: v.numpy() for k, v in model.state_dict().items() if not k.startswith("vision_model.")}
    back = text_to_torch(text_cfg, text, layout="hf_siglip")
    assert sorted(back) == sorted(sd) and all(np.array_equal(back[k], sd[k]) for k in sd)
    assert text_layout(back) == ("hf_siglip", "")  # told by the keys: text_model.head
    with pytest.raises(ValueError, match=r"has logit_bias, proj/bias, which the open_clip layout does not hold"):
        text_from_torch(folder, text_cfg, layout="open_clip")


def _reference_top1(model, folder: Path, test: Path) -> float:
    """Zero-shot top-1 of the SiglipModel / Siglip2Model in transformers on the eval view of the test images: per
    class the mean of its normalized template embeddings (its AutoTokenizer's ids, padded to the text positions),
    renormalized; images ranked by sigmoid(exp(logit_scale) * cosine + logit_bias) over the classes."""
    source = ImageFolderSource(test)
    view = published("siglip-base-patch16-224").eval_view(28)
    x = torch.from_numpy(next(iter(EvalBatches(source, batch_size=9, img_size=28, **view)))["images"])
    texts = [t.format(c) for c in SIGLIP_CLASSES for t in SIGLIP_TEMPLATES]
    length = model.config.text_config.max_position_embeddings
    ids = transformers.AutoTokenizer.from_pretrained(folder)(
        texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt"
    )
    normalize = torch.nn.functional.normalize
    with torch.no_grad():
        images = normalize(model.get_image_features(**pixels(model, x.permute(0, 3, 1, 2))).pooler_output)
        text = normalize(model.get_text_features(input_ids=ids["input_ids"]).pooler_output)
        classifier = normalize(text.reshape(3, 2, -1).mean(1)).T
        probs = torch.sigmoid(images @ classifier * model.logit_scale.exp() + model.logit_bias)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    return (probs.argmax(1) == labels).sum().item() / 9


@pytest.mark.slow
@pytest.mark.parametrize("directory", ["siglip_dir", "siglip2_dir"])
def test_zeroshot_eval_of_a_siglip_directory_through_the_cli(directory, request, tmp_path):
    """`dgmr-jax eval --model DIR --clip-text DIR --zeroshot` on a SiglipModel directory (the Hub layout: weights,
    config.json, spiece.model, preprocessor_config.json) and on a Siglip2Model one (tokenizer.model,
    tokenizer_config.json and tokenizer.json instead of spiece.model): top-1 equals transformers' sigmoid ranking."""
    model, folder, test, templates = request.getfixturevalue(directory)
    out = tmp_path / "result.json"
    argv = ["eval", "--model", str(folder), "--train", "none", "--test", str(test), "--batch", "9"]
    run = _cli(*argv, "--clip-text", str(folder), "--zeroshot", "--templates", str(templates), "--out", str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    top1 = _reference_top1(model, folder, test)
    result = json.loads(out.read_text())
    assert result["zeroshot"] == {"top1": top1, "templates": 2} and result["text_arch"] == folder.name
    assert run.stdout.splitlines()[-1] == f"zero-shot top1 {top1:.4f} (9 images, 3 classes)"


@pytest.fixture(scope="module")
def siglip2_dir(siglip_dir):
    """(Siglip2Model, its sharded directory with Gemma-style tokenizer files: a byte-fallback BPE tokenizer.model
    trained here with Gemma's ids (pad 0, eos 1, bos 2, unk 3) and its normalization (none: no dummy prefix, spaces
    kept), and the tokenizer.json + tokenizer_config.json transformers' GemmaTokenizer writes for it as SigLIP 2's
    Hub directories set it (no BOS, EOS, right padding); siglip_dir's test images and templates)."""
    spm = pytest.importorskip("sentencepiece")
    _, siglip_folder, test, templates = siglip_dir
    model, folder = saved("Siglip2Model", siglip_folder.parent)
    specials = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 3),
        model_prefix=str(folder / "tokenizer"),
        model_type="bpe",
        vocab_size=330,  # 256 byte pieces, the corpus' characters, a few dozen merges
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        hard_vocab_limit=False,
        minloglevel=2,
        **specials,
    )
    (folder / "tokenizer.vocab").unlink()
    settings = dict(add_bos_token=False, add_eos_token=True, padding_side="right")
    transformers.GemmaTokenizer.from_pretrained(folder, **settings).save_pretrained(folder)
    (folder / "preprocessor_config.json").symlink_to(siglip_folder / "preprocessor_config.json")
    return model, folder, test, templates


def test_siglip2_text_tower_and_gemma_tokenizer_equal_transformers(siglip2_dir, tmp_path):
    """A Siglip2Model directory's text tower, read by open_text_tower through the hf_siglip layout: its token ids
    equal transformers' Siglip2Tokenizer (what AutoTokenizer gives: Gemma's, lower-cased; padding to the 16
    positions, truncation keeping EOS), also with BOS and left padding set in tokenizer_config.json alone, and
    GemmaTokenizer's (as typed) where a SiglipModel config.json names Gemma's tokenizer (SigLIP 2 at a fixed size);
    get_text_features and logits_per_image agree <= 1e-5 relative, with the same ranking."""
    model, folder, _, _ = siglip2_dir
    source = open_model(folder)
    text_cfg, text, tokenizer = open_text_tower(folder, source.cfg)
    assert (text_cfg.causal, text_cfg.pool, text_cfg.proj_bias, text_cfg.scoring) == (False, "last", True, "sigmoid")
    assert (text_cfg.context_length, text_cfg.vocab_size, text_cfg.embed_dim) == (16, 330, 32)
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    assert type(reference).__name__ == "Siglip2Tokenizer"
    tokens = tokenizer(PROMPTS, context_length=16)
    assert tokens.tolist() == reference(PROMPTS, padding="max_length", truncation=True, max_length=16)["input_ids"]
    assert tokens[-1, -1] == 1 and tokens[0, -1] == 0  # cut: ends in EOS; padded on the right
    assert tokens[1].tolist() == tokenizer(PROMPTS[1].lower(), 16)[0].tolist()  # lower-cased
    # without tokenizer.json (whose template transformers follows) tokenizer_config.json's flags decide
    other = _linked(folder, tmp_path / "bos_left", "tokenizer.json", add_bos_token=True, padding_side="left")
    reference = transformers.AutoTokenizer.from_pretrained(other)
    ours = siglip_tokenizer(str(other))(PROMPTS, context_length=16)
    assert ours.tolist() == reference(PROMPTS, padding="max_length", truncation=True, max_length=16)["input_ids"]
    assert ours[0, 0] == 0 and ours[-1, 0] == 2 and 1 not in ours  # padded on the left, BOS, no EOS (flag absent)
    # SigLIP 2 at a fixed resolution as a SiglipModel with Gemma's files: transformers' GemmaTokenizer, not lower-cased
    fixed = _linked(folder, tmp_path / "siglip_gemma", "config.json")
    (fixed / "config.json").write_text(json.dumps({"architectures": ["SiglipModel"], "model_type": "siglip"}))
    reference = transformers.AutoTokenizer.from_pretrained(fixed)
    ours = siglip_tokenizer(str(fixed))(PROMPTS, context_length=16)
    assert type(reference).__name__ == "GemmaTokenizer" and ours[1].tolist() != tokens[1].tolist()
    assert ours.tolist() == reference(PROMPTS, padding="max_length", truncation=True, max_length=16)["input_ids"]

    ids, x = torch.from_numpy(tokens.astype(np.int64)), images(28, batch=3)
    with torch.no_grad():
        ref_text = model.get_text_features(input_ids=ids).pooler_output
        ref_logits = model(input_ids=ids, **pixels(model, x)).logits_per_image
    ours = encode_texts(text_cfg, text, tokens)
    err = rel_err(ours, ref_text.numpy())
    print(f"PARITY Siglip2Model text features rel={err:.2e}")
    assert err <= TOL
    image_emb = jax.jit(lambda p, x: dj.models.forward(source.cfg, p, x)["pooled"])(source.load(), to_nhwc(x))
    logits, _ = image_text_scores(text_cfg, text, image_emb, ours)
    err = rel_err(logits, ref_logits.numpy())
    print(f"PARITY Siglip2Model logits_per_image rel={err:.2e}")
    assert err <= TOL and np.array_equal(logits.argsort(1), ref_logits.numpy().argsort(1))


def _linked(folder: Path, to: Path, *skip: str, **settings) -> Path:
    """`to`: links to folder's files but `skip`, with its tokenizer_config.json updated by `settings` (a copy)."""
    to.mkdir()
    for f in folder.iterdir():
        if f.name not in skip and not (settings and f.name == "tokenizer_config.json"):
            (to / f.name).symlink_to(f)
    if settings:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (to / "tokenizer_config.json").write_text(json.dumps({**config, **settings}))
    return to


def test_siglip_text_tower_refusals_come_in_one_line(siglip_dir, siglip2_dir, tmp_path, capsys, monkeypatch):
    """Open_clip's flags on a SiglipModel / Siglip2Model directory, a directory without spiece.model, a Siglip2Model
    with tokenizer.json but no tokenizer.model, and a missing sentencepiece package each stop `eval` in one line,
    before any image is embedded."""
    _, folder, test, _ = siglip_dir
    base = ["eval", "--model", str(folder), "--train", "none", "--test", str(test), "--zeroshot", "--clip-text"]

    def error(clip_text: Path, *args: str) -> str:
        assert main([*base, str(clip_text), *args]) == 2
        return capsys.readouterr().err.removeprefix("dgmr-jax eval: error: ").removesuffix("\n")

    assert error(folder, "--text-arch", "ViT-B-32") == (
        f"{folder} is a SiglipModel directory, whose config.json and spiece.model give the text tower and its "
        "tokenizer: drop --text-arch and --bpe-vocab (they are for open_clip checkpoints)"
    )
    bare = _linked(folder, tmp_path / "bare", "spiece.model")
    assert error(bare) == (
        f"{bare} has no spiece.model: SiglipModel's SentencePiece tokenizer is read from it; copy it beside "
        "config.json from the model's Hub repository"
    )
    two = _linked(siglip2_dir[1], tmp_path / "siglip2", "tokenizer.model")
    assert error(two) == (
        f"{two} has no tokenizer.model: Siglip2Model's SentencePiece tokenizer is read from it (tokenizer.json alone "
        "is not read); copy it beside config.json from the model's Hub repository"
    )
    assert error(siglip2_dir[1], "--bpe-vocab", str(folder)) == (
        f"{siglip2_dir[1]} is a Siglip2Model directory, whose config.json and tokenizer.model give the text tower and "
        "its tokenizer: drop --text-arch and --bpe-vocab (they are for open_clip checkpoints)"
    )
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    assert error(folder) == (
        f"SigLIP's tokenizer ({folder / 'spiece.model'}) needs the sentencepiece package: pip install "
        "'dgmr-jax[siglip]' (or pip install sentencepiece)"
    )


def test_the_hub_so400m_config_gives_transformers_text_tower(tmp_path):
    """siglip-so400m-patch14-384's config.json (its text_config names only what differs from transformers'
    defaults) gives a 27-layer text tower embedding in the vision tower's 1152; at 2 of its layers (traced in
    seconds) the hf_siglip rules hold SiglipModel's text entries name for name and shape for shape (built on torch's
    meta device), at transformers' parameter count."""
    text = dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16, num_hidden_layers=27)
    config = dict(architectures=["SiglipModel"], text_config=text, vision_config=dict(text, image_size=384))
    (tmp_path / "config.json").write_text(json.dumps(config))
    layout, cfg = hf_text_config(str(tmp_path))
    assert layout == "hf_siglip"
    assert (cfg.vocab_size, cfg.context_length, cfg.layers, cfg.mlp_hidden, cfg.embed_dim) == (
        32000,
        64,
        27,
        4304,
        1152,
    )
    assert check_embedding(dj.models.preset("siglip-so400m-patch14-384"), cfg) is cfg
    cfg, small = cfg.replace(layers=2), dict(architectures=["SiglipModel"], text_config=dict(text, num_hidden_layers=2))
    ref, _ = meta_state_dict(lambda: transformers.SiglipModel(transformers.SiglipConfig(**small)))
    ref = {k: v for k, v in ref.items() if not k.startswith("vision_model.")}
    shapes, table = flatten(text_param_shapes(cfg)), text_rules(cfg, "hf_siglip")
    assert {k for r in table for k in r.torch} == set(ref) and {p for r in table for p in r.flax} == set(shapes)
    for rule in table:
        fakes = [np.empty(ref[k], np.dtype([])) for k in rule.torch]
        for path, value in zip(rule.flax, HOOKS[rule.hook][0](fakes), strict=True):
            assert value.shape == tuple(shapes[path].shape), (rule, value.shape)
    assert sum(int(np.prod(v.shape)) for v in shapes.values()) == sum(int(np.prod(v)) for v in ref.values())
