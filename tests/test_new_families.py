"""EVA-CLIP-8B/18B (family eva_clip) and InternViT (family internvit): parity with PyTorch references, strict
round trips, full-size presets key for key with exact parameter counts, and pruning streamed from a checkpoint.

References: no pip package ships EVA-CLIP-8B/18B, so tests/reference_eva_clip_18b.py re-states its architecture
from the official code. InternViT's reference is transformers' native InternVLVisionModel, the same computation
as OpenGVLab's remote-code InternVisionModel under other names; its keys are renamed here as transformers' own
InternVL converter renames InternVisionModel keys (q/k/v_proj split out of attn.qkv), in reverse.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import PartitionSpec
from reference import assert_same_tree, images, meta_state_dict, randomize, to_nhwc, torch
from reference_eva_clip_18b import OFFICIAL, EvaClipVision

import dgmr_jax as dj
from dgmr_jax.cli import main
from dgmr_jax.core.parallel import make_mesh, tree_shardings
from dgmr_jax.io.checkpoint_io import save_safetensors
from dgmr_jax.io.hf_config import hf_layout
from dgmr_jax.io.keymaps import torch_prefix
from dgmr_jax.io.open import open_model
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


# BAAI's remote-code EvaCLIPModel (EVA-CLIP-8B/18B Hub directories): its names of the official keys, as the MindSpore
# port of its modeling_evaclip.py (mindspore-lab/mindone) names its parameters; attn.qkv is split into q/k/v_proj
_HUB_TOP = {
    "patch_embed.proj.weight": "vision_model.embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "vision_model.embeddings.patch_embedding.bias",
    "cls_token": "vision_model.embeddings.class_embedding",  # no batch axes (_HUB_SHAPES)
    "pos_embed": "vision_model.embeddings.position_embedding.weight",  # an nn.Embedding
    "norm.weight": "vision_model.post_layernorm.weight",
    "head.weight": "visual_projection.weight",
}
_HUB_BLOCK = {
    "norm1.weight": "layer_norm1.weight",
    "norm2.weight": "layer_norm2.weight",
    "attn.proj.weight": "self_attn.out_proj.weight",
    "attn.proj.bias": "self_attn.out_proj.bias",
    **{f"mlp.{fc}.{p}": f"mlp.{fc}.{p}" for fc in ("fc1", "fc2") for p in ("weight", "bias")},
}
_HUB_SHAPES = {"cls_token": (-1,), "pos_embed": (5, -1)}  # the small tower: 2 x 2 patches and the class token
# entries of a full EvaCLIPModel that the vision tower skips: the text tower, its projection, the logit scale and the
# embeddings' position index buffer
_HUB_SKIPPED = {
    "vision_model.embeddings.position_ids": np.arange(5, dtype=np.int64)[None],
    "text_model.embeddings.token_embedding.weight": np.ones((10, 16), np.float32),
    "text_model.encoder.layers.0.self_attn.q_proj.weight": np.ones((16, 16), np.float32),
    "text_projection.weight": np.ones((32, 16), np.float32),
    "logit_scale": np.full((), 4.6, np.float32),
}


def _hub_state_dict(sd: dict[str, np.ndarray], head_bias: bool) -> dict[str, np.ndarray]:
    """An official EVA-CLIP-8B/18B tower's weights under the Hub names, with the entries it skips and, when
    head_bias, a visual_projection bias (the port's Linear has one by default; BAAI's weights may not)."""
    out = dict(_HUB_SKIPPED)
    for key, value in sd.items():
        block = re.fullmatch(r"blocks\.(\d+)\.(.*)", key)
        if not block:
            out[_HUB_TOP[key]] = value.reshape(_HUB_SHAPES.get(key, value.shape))
            continue
        prefix = f"vision_model.encoder.layers.{block.group(1)}."
        if block.group(2) == "attn.qkv.weight":
            thirds = zip("qkv", np.split(value, 3), strict=True)
            out |= {f"{prefix}self_attn.{p}_proj.weight": third for p, third in thirds}
        else:
            out[prefix + _HUB_BLOCK[block.group(2)]] = value
    if head_bias:
        out["visual_projection.bias"] = np.linspace(-1, 1, 32, dtype=np.float32)
    return out


def _hub_config(name: str, **vision) -> dict:
    """config.json of the small tower as an EvaCLIPModel (the vision_config fields that the port reads)."""
    sizes = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=320, image_size=28)
    sizes |= dict(patch_size=14, num_channels=3, layer_norm_eps=1e-6, hidden_act="gelu", use_rms_norm=True)
    switches = dict(q_bias=False, k_bias=False, v_bias=False, use_sub_ln=False, use_swiglu_mlp=False, use_rope=False)
    text = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, vocab_size=10)
    vision_config = sizes | switches | dict(post_layernorm=OFFICIAL[name]["postnorm"]) | vision
    return dict(architectures=["EvaCLIPModel"], projection_dim=32, vision_config=vision_config, text_config=text)


def _write_shards(folder, sd: dict[str, np.ndarray], fmt: str, count: int = 3) -> None:
    """sd as transformers' sharded checkpoint: `count` pytorch_model-0000i-of-0000n.bin (fmt "bin") or
    model-0000i-of-0000n.safetensors shards, every tensor of a block not in one shard, and their index."""
    stem = "pytorch_model" if fmt == "bin" else "model"
    names, weight_map = list(sd), {}
    for i in range(count):
        part, shard = {k: sd[k] for k in names[i::count]}, f"{stem}-{i + 1:05d}-of-{count:05d}.{fmt}"
        if fmt == "bin":
            torch.save({k: torch.from_numpy(np.array(v)) for k, v in part.items()}, folder / shard)
        else:
            save_safetensors(folder / shard, part)
        weight_map |= dict.fromkeys(part, shard)
    (folder / f"{stem}.{fmt}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _hub_folder(name: str, fmt: str, root):
    """(reference, its official-layout conversion's params, the Hub directory, its state dict): EVA-CLIP-8B's with a
    visual_projection bias in .bin shards, EVA-CLIP-18B's without one in .safetensors shards."""
    ref, cfg = _small(name, hidden=320)
    sd = _checkpoint(ref)
    hub = _hub_state_dict(sd, head_bias=name == "EVA-CLIP-8B")
    folder = root / name
    folder.mkdir()
    _write_shards(folder, hub, fmt)
    (folder / "config.json").write_text(json.dumps(_hub_config(name)))
    return ref, dj.convert.from_torch(sd, family="eva_clip", arch=cfg)[1], folder, hub


def _assert_hub_params(params, official, hub: dict[str, np.ndarray]) -> None:
    """The Hub directory's params are the official conversion's bit for bit, plus the head's bias when it has one."""
    a, b = flatten(params), flatten(official)
    assert set(a) - set(b) == ({"head/bias"} if "visual_projection.bias" in hub else set()) and set(b) <= set(a)
    assert all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize("name, fmt", [("EVA-CLIP-8B", "bin"), ("EVA-CLIP-18B", "safetensors")])
def test_evaclip_hub_directory_opens_without_family_or_arch(name, fmt, tmp_path):
    """BAAI's sharded transformers directory (remote-code EvaCLIPModel) reads as the official .pt does, at parity with
    the reference: pooled and projected vectors, and the tokens after the final norm (the remote code's
    last_hidden_state is before it); the text tower's entries are skipped; written back in its own layout exactly."""
    ref, official, folder, hub = _hub_folder(name, fmt, tmp_path)
    source = open_model(folder)
    assert source.meta["family"] == "hf_evaclip" and source.cfg.name == name
    assert source.cfg.post_norm == OFFICIAL[name]["postnorm"] and source.cfg.num_classes == 32
    params = source.load()
    _assert_hub_params(params, official, hub)
    x = images(28)
    want = _outputs(ref, x)
    if "visual_projection.bias" in hub:
        want["logits"] = want["logits"] + torch.from_numpy(hub["visual_projection.bias"])
    _assert_parity(f"hf_evaclip/{name}", dj.models.forward(source.cfg, params, to_nhwc(x)), want)
    back = dj.convert.to_torch(source.cfg, params, "hf_evaclip", prefix="vision_model.")
    tower = {k: v for k, v in hub.items() if k not in _HUB_SKIPPED}
    assert sorted(back) == sorted(tower) and all(np.array_equal(back[k], v) for k, v in tower.items())


def test_evaclip_hub_configs_read_or_refuse_in_one_line(tmp_path, capsys):
    """The flat config.json of EvaCLIPVisionModel(WithProjection) gives the same tower; a switch the eva_clip model
    cannot compute (use_rope), or a k bias without q and v ones, stops convert in one line naming the field and
    the official .pt, writing nothing; the converted model has no transformers class to export as."""
    _, _, folder, _ = _hub_folder("EVA-CLIP-18B", "safetensors", tmp_path)
    family, cfg = hf_layout(str(folder))
    config = _hub_config("EVA-CLIP-18B")
    for arch, projection in [("EvaCLIPVisionModelWithProjection", 32), ("EvaCLIPVisionModel", 0)]:
        flat = dict(config["vision_config"], architectures=[arch], projection_dim=projection)
        (folder / "config.json").write_text(json.dumps(flat))
        assert hf_layout(str(folder)) == (family, cfg.replace(num_classes=projection)), arch
    official = "convert BAAI's official .pt instead (--family eva_clip --arch EVA-CLIP-8B, -8B-448 or -18B)"
    refused = {
        "use_rope": f"config.json sets use_rope true (rotary position embeddings), which is not read here; {official}",
        "k_bias": "config.json sets q_bias False, k_bias True, v_bias False: the tower takes q, k and v biases all, "
        f"none or q and v only; {official}",
    }
    for field, line in refused.items():
        (folder / "config.json").write_text(json.dumps(_hub_config("EVA-CLIP-18B", **{field: True})))
        assert main(["convert", "--checkpoint", str(folder), "--out", str(tmp_path / "never")]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [f"dgmr-jax convert: error: {line}"], field
        assert not (tmp_path / "never").exists()
    (folder / "config.json").write_text(json.dumps(config))
    assert main(["convert", "--checkpoint", str(folder), "--out", str(tmp_path / "model")]) == 0
    argv = ["export", "--model", str(tmp_path / "model"), "--format", "transformers", "--out", str(tmp_path / "hf")]
    assert main(argv) == 2 and not (tmp_path / "hf").exists()
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("dgmr-jax export: error: model EVA-CLIP-18B (family hf_evaclip) fits no transformers class")
    assert line.endswith("; export it with --format torch")


@pytest.mark.slow
def test_evaclip_hub_directory_converts_through_the_cli(tmp_path):
    """A user's `dgmr-jax convert --checkpoint DIR` on EVA-CLIP-8B's sharded .bin directory: exit 0, and the model
    directory holds the official conversion's params (and the projection's bias)."""
    _, official, folder, hub = _hub_folder("EVA-CLIP-8B", "bin", tmp_path)
    out = tmp_path / "eva-clip-8b"
    argv = [sys.executable, "-m", "dgmr_jax.cli", "convert", "--checkpoint", str(folder), "--out", str(out)]
    run = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith(f"wrote {out}: EVA-CLIP-8B, ")
    cfg, params = load_model(out)
    assert cfg.norm == "rmsnorm" and cfg.head_bias and not cfg.post_norm
    _assert_hub_params(params, official, hub)
