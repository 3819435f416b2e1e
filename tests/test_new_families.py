"""EVA-CLIP-8B/18B (family eva_clip) and InternViT (family internvit): parity with PyTorch references, strict
round trips, full-size presets key for key with exact parameter counts, and pruning streamed from a checkpoint.

References: no pip package ships EVA-CLIP-8B/18B, so tests/reference_eva_clip_18b.py re-states its architecture
from the official code. InternViT's reference is transformers' native InternVLVisionModel, the same computation
as OpenGVLab's remote-code InternVisionModel under other names; its keys are renamed here as transformers' own
InternVL converter renames InternVisionModel keys (q/k/v_proj split out of attn.qkv), in reverse.
"""

from __future__ import annotations

import numpy as np
import pytest
from jax.sharding import PartitionSpec
from reference import assert_same_tree, images, meta_state_dict, randomize, to_nhwc, torch
from reference_eva_clip_18b import OFFICIAL, EvaClipVision

import dgmr_jax as dj
from dgmr_jax.cli import main
from dgmr_jax.core.parallel import make_mesh, tree_shardings
from dgmr_jax.io.checkpoint_io import save_safetensors
from dgmr_jax.io.keymaps import torch_prefix
from dgmr_jax.model_dir import load_model
from dgmr_jax.models.tree import flatten

transformers = pytest.importorskip("transformers")

TOL = 1e-5
SMALL = dict(img_size=28, width=64, depth=2, num_heads=4)  # two 2x2-patch blocks, head_dim 16
# exact parameter counts of the full presets (equal to the references' counts, see the key-for-key tests)
COUNTS = {
    "EVA-CLIP-8B": 7_526_088_704,
    "EVA-CLIP-8B-448": 7_529_234_432,
    "EVA-CLIP-18B": 17_630_494_720,
    "InternViT-6B-448px-V2_5": 5_536_496_000,
    "InternViT-300M-448px-V2_5": 304_012_288,
}
# InternVLVisionConfig of each InternViT preset (the remote-code config's qkv_bias / qk_normalization renamed)
INTERNVIT = {
    "InternViT-6B-448px-V2_5": dict(
        hidden_size=3200,
        num_hidden_layers=45,
        num_attention_heads=25,
        intermediate_size=12800,
        norm_type="rms_norm",
        use_qk_norm=True,
        attention_bias=False,
    ),
    "InternViT-300M-448px-V2_5": dict(
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        norm_type="layer_norm",
        use_qk_norm=False,
        attention_bias=True,
    ),
}
_RENAMES = (  # transformers InternVLVisionModel -> InternVisionModel, in this order
    ("embeddings.cls_token", "embeddings.class_embedding"),
    ("embeddings.position_embeddings", "embeddings.position_embedding"),
    ("embeddings.patch_embeddings.projection", "embeddings.patch_embedding"),
    ("encoder.layer.", "encoder.layers."),
    ("attention.projection_layer", "attn.proj"),
    ("attention.", "attn."),
    ("layernorm_before", "norm1"),
    ("layernorm_after", "norm2"),
    ("lambda_1", "ls1"),
    ("lambda_2", "ls2"),
)
_QKV = ("q_proj", "k_proj", "v_proj")


def _internvit_name(hf_key: str) -> str:
    for old, new in _RENAMES:
        hf_key = hf_key.replace(old, new)
    for part in _QKV:
        hf_key = hf_key.replace(f"attn.{part}.", "attn.qkv.")
    return hf_key


def hf_to_internvit(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """InternVLVisionModel state dict -> InternVisionModel names, q/k/v concatenated into qkv (meta tensors too)."""
    parts: dict[str, list[torch.Tensor]] = {}
    for key, value in sd.items():
        parts.setdefault(_internvit_name(key), []).append(value)
    return {k: v[0] if len(v) == 1 else torch.cat(v) for k, v in parts.items()}


def internvit_to_hf(sd: dict[str, np.ndarray], hf_keys: list[str]) -> dict[str, torch.Tensor]:
    """The inverse: InternVisionModel names -> hf_keys, qkv split into thirds."""
    out = {}
    for key in hf_keys:
        value = torch.from_numpy(sd[_internvit_name(key)])
        thirds = [i for i, part in enumerate(_QKV) if f".{part}." in key]
        out[key] = torch.chunk(value, 3)[thirds[0]] if thirds else value
    return out


def _hf_internvit(name: str, **size):
    from transformers import InternVLVisionConfig, InternVLVisionModel

    config = InternVLVisionConfig(**{**INTERNVIT[name], **size}, layer_norm_eps=1e-6, use_mean_pooling=True)
    config._attn_implementation = "eager"  # the plain softmax(q k^T / sqrt(d)) v of the remote code's naive path
    return InternVLVisionModel(config)


def _small(name: str, hidden: int, seed: int = 0):
    """(reference module with seeded weights, matching small ModelConfig) for a new preset."""
    if name in OFFICIAL:
        ref = EvaClipVision(28, 14, 64, 2, 4, hidden, 32, OFFICIAL[name]["postnorm"])
        cfg = dj.models.preset(name, **SMALL, hidden=hidden, num_classes=32)
    else:
        small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=14)
        ref = _hf_internvit(name, **small, intermediate_size=hidden)
        cfg = dj.models.preset(name, **SMALL, hidden=hidden)
    return randomize(ref, seed), cfg


def _outputs(ref, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        if isinstance(ref, EvaClipVision):
            return ref(x)
        tokens = ref(pixel_values=x).last_hidden_state
    return {"tokens": tokens, "pooled": tokens[:, 0]}  # InternVisionModel's pooler_output: token 0


def _checkpoint(ref) -> dict[str, np.ndarray]:
    """The reference's weights in its family's checkpoint layout (InternVisionModel names for InternViT)."""
    sd = ref.state_dict() if isinstance(ref, EvaClipVision) else hf_to_internvit(ref.state_dict())
    return {k: v.numpy() for k, v in sd.items()}


def _load_strict(ref, sd: dict[str, np.ndarray]) -> None:
    if isinstance(ref, EvaClipVision):
        ref.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    else:
        ref.load_state_dict(internvit_to_hf(sd, list(ref.state_dict())), strict=True)


def _assert_parity(label: str, out: dict, want: dict[str, torch.Tensor]) -> None:
    """Max abs error and max abs error / max |reference| of each output, printed for the parity table."""
    assert set(want) <= set(out)
    for key, ref in want.items():
        diff = np.abs(np.asarray(out[key], np.float64) - ref.numpy())
        abs_err, rel_err = float(diff.max()), float(diff.max() / np.abs(ref.numpy()).max())
        print(f"PARITY {label:28s} {key:7s} max_abs={abs_err:.2e} rel={rel_err:.2e}")
        assert abs_err <= TOL and rel_err <= TOL, (key, abs_err, rel_err)


FAMILY = {name: "eva_clip" for name in OFFICIAL} | {name: "internvit" for name in INTERNVIT}
PARITY = ["EVA-CLIP-8B", "EVA-CLIP-18B", "InternViT-6B-448px-V2_5", "InternViT-300M-448px-V2_5"]


def _slow_if_6b(name: str):
    """InternViT-6B cases take seconds (a 6B config built beside its reference): the slow tier."""
    return pytest.param(name, marks=pytest.mark.slow) if name == "InternViT-6B-448px-V2_5" else name


@pytest.mark.parametrize("name", [_slow_if_6b(n) for n in PARITY])
def test_parity_and_strict_round_trip(name):
    family = FAMILY[name]
    ref, cfg = _small(name, hidden=5 * 64 if family == "eva_clip" else 4 * 64)
    sd = _checkpoint(ref)
    # full checkpoints: EVA-CLIP's tower sits under "visual.", an InternVL chat model's under "vision_model."
    prefix = torch_prefix(family)
    full = {prefix + k: v for k, v in sd.items()} | {"mlp1.0.weight": np.zeros(3, np.float32)}
    cfg, params = dj.convert.from_torch(full, family=family, arch=cfg)
    x = images(28)
    want = _outputs(ref, x)
    _assert_parity(f"{family}/{name}", dj.models.forward(cfg, params, to_nhwc(x)), want)

    if family == "internvit":
        x42 = images(42)  # a 3x3 grid: the position grid is resized, bicubic without antialiasing
        _assert_parity(f"{family}/{name} 42px", dj.models.forward(cfg, params, to_nhwc(x42)), _outputs(ref, x42))
        # a wrong family is named in the error (EVA-CLIP-8B/18B keys, prefix aside, are timm's: both read them)
        with pytest.raises(dj.convert.CheckpointError, match="The keys fit family='internvit'"):
            dj.convert.from_torch(sd, family="timm", arch=cfg)
    back = dj.convert.to_torch(cfg, params, family)
    assert sorted(back) == sorted(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and np.array_equal(back[k], v), k
    fresh = _small(name, hidden=cfg.mlp_hidden[0], seed=9)[0]
    _load_strict(fresh, back)
    for key, value in _outputs(fresh, x).items():
        assert torch.equal(value, want[key]), key


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_eva_clip_giants_key_for_key(name):
    ref, count = meta_state_dict(lambda: EvaClipVision(**OFFICIAL[name]))
    cfg = dj.models.preset(name)
    assert_same_tree(cfg, "eva_clip", ref)
    print(f"PARAMS {name}: ours {dj.prune.count_params(cfg):,} reference {count:,}")
    assert dj.prune.count_params(cfg) == count == COUNTS[name]


@pytest.mark.parametrize("name", [_slow_if_6b(n) for n in sorted(INTERNVIT)])
def test_internvit_giants_key_for_key(name):
    with torch.device("meta"):
        module = _hf_internvit(name, image_size=448, patch_size=14)
    count = sum(p.numel() for p in module.parameters())
    ref = {k: tuple(v.shape) for k, v in hf_to_internvit(module.state_dict()).items()}
    cfg = dj.models.preset(name)
    assert_same_tree(cfg, "internvit", ref)
    print(f"PARAMS {name}: ours {dj.prune.count_params(cfg):,} reference {count:,}")
    assert dj.prune.count_params(cfg) == count == COUNTS[name]


@pytest.mark.parametrize("name", ["EVA-CLIP-18B", "InternViT-6B-448px-V2_5"])
def test_streamed_prune_equals_in_memory_and_loads_into_the_reference(name, tmp_path):
    """RMSNorm, post-norm and q/k-norm towers prune from a .safetensors checkpoint like prune_mlp in memory; the
    export loads strictly into the reference built with the pruned width and computes the same."""
    family = FAMILY[name]
    ref, cfg = _small(name, hidden=256)
    ckpt, arch, out = tmp_path / "tower.safetensors", tmp_path / "arch.json", tmp_path / "pruned"
    save_safetensors(ckpt, {torch_prefix(family) + k: v for k, v in _checkpoint(ref).items()})
    arch.write_text(cfg.to_json())
    argv = ["prune", "--checkpoint", str(ckpt), "--family", family, "--arch", str(arch), "--mlp-ratio", "0.5"]
    assert main([*argv, "--out", str(out)]) == 0

    streamed_cfg, streamed = load_model(out)
    full_cfg, full = dj.convert.from_torch(ckpt, family=family, arch=str(arch))
    mem_cfg, mem = dj.prune.prune_mlp(full_cfg, full, mlp_ratio=0.5)
    assert streamed_cfg == mem_cfg and mem_cfg.mlp_hidden == (32, 32)
    a, b = flatten(streamed), flatten(mem)
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)

    slim = _small(name, hidden=32, seed=9)[0]
    _load_strict(slim, dj.convert.to_torch(mem_cfg, mem, family))
    x = images(28)
    _assert_parity(f"{family}/{name} pruned", dj.models.forward(mem_cfg, mem, to_nhwc(x)), _outputs(slim, x))


def test_new_fields_are_validated_counted_and_sharded():
    with pytest.raises(ValueError, match="norm must be one of"):
        dj.models.ModelConfig(norm="batchnorm")
    with pytest.raises(ValueError, match="qk_norm must be one of"):
        dj.models.ModelConfig(qk_norm="head")
    cfg = dj.models.preset("InternViT-6B-448px-V2_5", **SMALL, hidden=256)
    axes = flatten(dj.models.logical_axes(cfg))
    assert axes["blocks_0/attn/q_norm/scale"] == PartitionSpec("heads")
    assert axes["blocks_0/norm1/scale"] == PartitionSpec("embed") and "blocks_0/norm1/bias" not in axes
    shardings = tree_shardings(dj.models.logical_axes(cfg), dj.models.param_shapes(cfg), make_mesh(2, 2, 2))
    assert flatten(shardings)["blocks_1/attn/k_norm/scale"].spec == PartitionSpec("tensor")
    eva = flatten(dj.models.param_shapes(dj.models.preset("EVA-CLIP-18B", **SMALL, hidden=256)))
    assert "head/kernel" in eva and "head/bias" not in eva and "blocks_0/norm2/bias" not in eva
    # FLOPs count matmuls only (norms excluded), so the new norms add none; the bias-free head costs the same
    assert dj.prune.count_flops(cfg) == dj.prune.count_flops(cfg.replace(norm="layernorm", qk_norm=""))
