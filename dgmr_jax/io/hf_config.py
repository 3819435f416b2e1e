"""Hugging Face checkpoints as people download them: a directory (or a shard index) whose transformers config.json
names the class and its sizes, read as a family and a ModelConfig so no family= / arch= is needed; the image
processor's preprocessor_config.json, when there, gives the preprocessing. EXPORTS writes both back for
`export --format transformers` (dgmr_jax/io/hf_export.py)."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable, Collection
from typing import Any

from dgmr_jax.core.errors import UserError
from dgmr_jax.io.checkpoint_io import HF_WEIGHTS, CheckpointError, open_state_dict
from dgmr_jax.models.config import ModelConfig
from dgmr_jax.models.preprocess import Preprocess
from dgmr_jax.models.presets import preset
from dgmr_jax.models.text import TextConfig
from dgmr_jax.models.tokenizer import SiglipTokenizer, hf_vocab_files, siglip_clean

CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
SPIECE_FILE, TOKENIZER_CONFIG_FILE = "spiece.model", "tokenizer_config.json"  # SigLIP's tokenizer
GEMMA_FILE, TOKENIZER_FILE = "tokenizer.model", "tokenizer.json"  # SigLIP 2's (Gemma's SentencePiece model, its JSON)
# transformers' defaults of the fields read below, for config.json files (nested vision_config) that omit them
_DINOV2 = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4, image_size=224)
_DINOV2 |= dict(patch_size=14, layer_norm_eps=1e-6, qkv_bias=True, use_swiglu_ffn=False, hidden_act="gelu")
_CLIP = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224)
_CLIP |= dict(patch_size=32, layer_norm_eps=1e-5, hidden_act="quick_gelu", projection_dim=512)
_SIGLIP = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224)
_SIGLIP |= dict(patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh", vision_use_head=True)
# transformers' defaults (CLIPTextConfig, SiglipTextConfig) of the text_config fields read below, for a
# CLIPModel / SiglipModel config.json whose text_config omits them
_CLIP_TEXT = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12)
_CLIP_TEXT |= dict(num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5)
_CLIP_TEXT |= dict(eos_token_id=49407)
_SIGLIP_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
_SIGLIP_TEXT |= dict(vocab_size=32000, max_position_embeddings=64, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")
# transformers' ACT2FN names -> mlp_type (gelu_new and gelu_pytorch_tanh are both the tanh approximation)
_ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
_HF_ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh"}  # the inverse
_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL filter numbers of an image processor's "resample"


def is_hf_checkpoint(spec: str) -> bool:
    """A shard index, or a local directory holding transformers weights (HF_WEIGHTS)."""
    if spec.endswith(".index.json"):
        return True
    return os.path.isdir(spec) and any(os.path.isfile(os.path.join(spec, name)) for name in HF_WEIGHTS)


def _sizes(c: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The fields of a (vision) config with transformers' defaults filled in; an unread activation is refused."""
    c = {**defaults, **c}
    if c["hidden_act"] not in _ACTIVATIONS:
        raise UserError(f"hidden_act {c['hidden_act']!r} is not supported; known: {', '.join(_ACTIVATIONS)}")
    return c


def _common(c: dict[str, Any]) -> dict[str, Any]:
    """The sizes every transformers vision config names alike, as ModelConfig fields; an image size that is not a
    multiple of the patch size (SigLIP so400m's 384 px in 14 px patches) is the grid the patch conv cuts from it."""
    return dict(
        img_size=c["image_size"] // c["patch_size"] * c["patch_size"],
        patch_size=c["patch_size"],
        width=c["hidden_size"],
        depth=c["num_hidden_layers"],
        num_heads=c["num_attention_heads"],
        norm_eps=c["layer_norm_eps"],
    )


def _dinov2_hidden(width: int, mlp_ratio: float, swiglu: bool) -> int:
    """The MLP width transformers' Dinov2MLP (width * mlp_ratio) or Dinov2SwiGLUFFN (2/3 of it, rounded up to a
    multiple of 8) builds."""
    hidden = int(width * mlp_ratio)
    return (int(hidden * 2 / 3) + 7) // 8 * 8 if swiglu else hidden


def _dinov2(c: dict[str, Any]) -> ModelConfig:
    """Dinov2Model / Dinov2WithRegistersModel; a SwiGLU MLP is sized as transformers' Dinov2SwiGLUFFN sizes it."""
    c = _sizes(c, _DINOV2)
    swiglu = dict(mlp_type="swiglu", mlp_packed=True) if c["use_swiglu_ffn"] else {}
    return preset(
        "vit_base_patch14_dinov2",
        **_common(c),
        hidden=_dinov2_hidden(c["hidden_size"], c["mlp_ratio"], bool(swiglu)),
        qkv_bias="full" if c["qkv_bias"] else "none",
        reg_tokens=c.get("num_register_tokens", 0),
        **swiglu,
    )


def _clip(c: dict[str, Any], projection: bool) -> ModelConfig:
    """CLIPVisionModel (no projection), CLIPVisionModelWithProjection and CLIPModel's vision tower."""
    c = _sizes(c, _CLIP)
    return preset(
        "ViT-B-16",
        **_common(c),
        hidden=c["intermediate_size"],
        mlp_type=_ACTIVATIONS[c["hidden_act"]],
        proj_dim=c["projection_dim"] if projection else 0,
    )


def _siglip(c: dict[str, Any]) -> ModelConfig:
    """SiglipVisionModel and SiglipModel's vision tower (the fixed-resolution SigLIP 2 checkpoints too): the
    attention-pool head is needed, as the pooled vector is its output."""
    c = _sizes(c, _SIGLIP)
    if not c["vision_use_head"]:
        raise UserError(
            "config.json sets vision_use_head=false (a SigLIP tower without its attention-pool head), which is not "
            "read: the pooled vector is the head's output; convert a checkpoint that has the head"
        )
    return preset(
        "siglip-base-patch16-224", **_common(c), hidden=c["intermediate_size"], mlp_type=_ACTIVATIONS[c["hidden_act"]]
    )


def _siglip2(c: dict[str, Any]) -> ModelConfig:
    """Siglip2VisionModel and Siglip2Model's vision tower at the fixed resolution of its square position grid
    (num_patches positions)."""
    side = math.isqrt(c.get("num_patches", 256))
    if side * side != c.get("num_patches", 256):
        raise UserError(f"config.json's num_patches {c['num_patches']} is not a square grid, which is not read")
    return _siglip({**c, "image_size": side * c.get("patch_size", 16)})


def _internvit(c: dict[str, Any]) -> ModelConfig:
    """OpenGVLab's InternVisionModel (remote code), alone or as an InternVLChatModel's vision_config."""
    rms = c.get("norm_type", "rms_norm") == "rms_norm"
    return preset(
        "InternViT-300M-448px-V2_5",
        **_common({"layer_norm_eps": 1e-6, "image_size": 448, "patch_size": 14, **c}),
        hidden=c["intermediate_size"],
        norm="rmsnorm" if rms else "layernorm",
        qk_norm="full" if c.get("qk_normalization") else "",
        qkv_bias="full" if c.get("qkv_bias", True) else "none",
    )


# the vision config fields an EvaCLIP config.json must state (BAAI's config class, and so its defaults, is not read)
_EVACLIP_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size")
_EVACLIP_SIZES += ("patch_size", "layer_norm_eps", "hidden_act")
_EVACLIP_REFUSED = dict(use_rope="rotary position embeddings", use_swiglu_mlp="a SwiGLU MLP", use_sub_ln="sub-LN norms")
_EVACLIP_QKV = {(True, True, True): "full", (True, False, True): "qv", (False, False, False): "none"}
_EVACLIP_OFFICIAL = "convert BAAI's official .pt instead (--family eva_clip --arch EVA-CLIP-8B, -8B-448 or -18B)"


def _evaclip_switches(c: dict[str, Any], names: Collection[str]) -> dict[str, bool]:
    """An EvaCLIP vision config's switches; one that config.json leaves out is read from block 0's tensor names where
    they tell it (a q/k/v bias, a norm without bias: RMSNorm), else false."""
    block = "vision_model.encoder.layers.0."
    told = {f"{p}_bias": f"{block}self_attn.{p}_proj.bias" in names for p in "qkv"}
    told["use_rms_norm"] = f"{block}layer_norm1.bias" not in names
    fields = (*told, *_EVACLIP_REFUSED, "post_layernorm")
    return {f: bool(c[f]) if c.get(f) is not None else told.get(f, False) for f in fields}


def _evaclip(c: dict[str, Any], projection_dim: int, names: Collection[str]) -> ModelConfig:
    """EvaCLIPVisionModel (projection_dim 0), EvaCLIPVisionModelWithProjection and EvaCLIPModel's vision tower: BAAI's
    remote code for EVA-CLIP-8B/18B, laid out as a port of its modeling_evaclip.py builds it. The head is
    visual_projection, with a bias when the weights hold one; what the eva_clip presets cannot compute is refused."""
    missing = [f for f in _EVACLIP_SIZES if f not in c]
    if missing:
        raise UserError(f"config.json's EvaCLIP vision config lacks {', '.join(missing)}; {_EVACLIP_OFFICIAL}")
    c = _sizes(c, {})
    s = _evaclip_switches(c, names)
    for field, what in _EVACLIP_REFUSED.items():
        if s[field]:
            raise UserError(f"config.json sets {field} true ({what}), which is not read here; {_EVACLIP_OFFICIAL}")
    biases = (s["q_bias"], s["k_bias"], s["v_bias"])
    if biases not in _EVACLIP_QKV:
        raise UserError(
            f"config.json sets q_bias {biases[0]}, k_bias {biases[1]}, v_bias {biases[2]}: the tower takes q, k "
            f"and v biases all, none or q and v only; {_EVACLIP_OFFICIAL}"
        )
    return preset(
        "EVA-CLIP-8B",
        **_common(c),
        hidden=c["intermediate_size"],
        mlp_type=_ACTIVATIONS[c["hidden_act"]],
        norm="rmsnorm" if s["use_rms_norm"] else "layernorm",
        post_norm=s["post_layernorm"],
        qkv_bias=_EVACLIP_QKV[biases],
        num_classes=projection_dim,
        head_bias=projection_dim > 0 and "visual_projection.bias" in names,
    )


Names = Callable[[], Collection[str]]  # the checkpoint's tensor names, read only by a class that needs them
# architectures[0] -> (family, ModelConfig from the whole config.json and the checkpoint's tensor names)
CLASSES: dict[str, tuple[str, Callable[[dict[str, Any], Names], ModelConfig]]] = {
    "Dinov2Model": ("hf_dinov2", lambda c, _: _dinov2(c)),
    "Dinov2WithRegistersModel": ("hf_dinov2", lambda c, _: _dinov2(c)),
    "CLIPVisionModel": ("hf_clip", lambda c, _: _clip(c, projection=False)),
    "CLIPVisionModelWithProjection": ("hf_clip", lambda c, _: _clip(c, projection=True)),
    "CLIPModel": (
        "hf_clip",
        lambda c, _: _clip({**c.get("vision_config", {}), "projection_dim": c.get("projection_dim", 512)}, True),
    ),
    "SiglipVisionModel": ("hf_siglip", lambda c, _: _siglip(c)),
    "SiglipModel": ("hf_siglip", lambda c, _: _siglip(c.get("vision_config", {}))),
    "Siglip2VisionModel": ("hf_siglip2", lambda c, _: _siglip2(c)),
    "Siglip2Model": ("hf_siglip2", lambda c, _: _siglip2(c.get("vision_config", {}))),
    "InternVisionModel": ("internvit", lambda c, _: _internvit(c)),
    "InternVLChatModel": ("internvit", lambda c, _: _internvit(c.get("vision_config", {}))),
    "EvaCLIPVisionModel": ("hf_evaclip", lambda c, names: _evaclip(c, 0, names())),
    "EvaCLIPVisionModelWithProjection": (
        "hf_evaclip",
        lambda c, names: _evaclip(c, c.get("projection_dim", 0), names()),
    ),
    "EvaCLIPModel": (
        "hf_evaclip",
        lambda c, names: _evaclip(c.get("vision_config", {}), c.get("projection_dim", 0), names()),
    ),
}


def _common_json(cfg: ModelConfig) -> dict[str, Any]:
    """The inverse of _common: cfg's sizes as every transformers vision config names them."""
    return dict(
        image_size=cfg.img_size,
        patch_size=cfg.patch_size,
        num_channels=3,
        hidden_size=cfg.width,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads,
        layer_norm_eps=cfg.norm_eps,
    )


def _dinov2_json(cfg: ModelConfig) -> dict[str, Any]:
    """Dinov2Config (Dinov2WithRegistersConfig with registers) of cfg; its MLP width as the integer mlp_ratio that
    transformers' (strict) config takes, else a one-line UserError."""
    hidden = cfg.mlp_hidden[0]
    ratios = [r for r in range(1, 2 * hidden // cfg.width + 2) if _dinov2_hidden(cfg.width, r, cfg.gated) == hidden]
    if not ratios:
        swiglu = " (SwiGLU: 2/3 of it, rounded up to a multiple of 8)" if cfg.gated else ""
        raise UserError(
            f"its Dinov2Config sizes the MLP as an integer mlp_ratio times the width {cfg.width}{swiglu}, which "
            f"never gives {hidden}"
        )
    registers = dict(num_register_tokens=cfg.reg_tokens) if cfg.reg_tokens else {}
    return dict(
        architectures=["Dinov2WithRegistersModel" if registers else "Dinov2Model"],
        model_type="dinov2_with_registers" if registers else "dinov2",
        **_common_json(cfg),
        mlp_ratio=ratios[0],
        hidden_act="gelu",
        qkv_bias=cfg.qkv_bias == "full",
        use_swiglu_ffn=cfg.gated,
        **registers,
    )


def _clip_json(cfg: ModelConfig) -> dict[str, Any]:
    """CLIPVisionConfig of cfg: CLIPVisionModelWithProjection when cfg has a projection, else CLIPVisionModel."""
    return dict(
        architectures=["CLIPVisionModelWithProjection" if cfg.proj_dim else "CLIPVisionModel"],
        model_type="clip_vision_model",
        **_common_json(cfg),
        intermediate_size=cfg.mlp_hidden[0],
        hidden_act=_HF_ACTIVATIONS[cfg.mlp_type],
        projection_dim=cfg.proj_dim or _CLIP["projection_dim"],
    )


def _siglip_json(cfg: ModelConfig) -> dict[str, Any]:
    """SiglipVisionConfig of cfg. Its attention-pool head's MLP has the blocks' width (intermediate_size), so a
    model whose blocks were pruned and whose head was not (pool_hidden) is refused in one line."""
    if cfg.pool_hidden != cfg.mlp_hidden[0]:
        raise UserError(
            f"its SiglipVisionConfig gives the attention-pool head's MLP the blocks' width, and this model's head "
            f"keeps {cfg.pool_hidden} against blocks of {cfg.mlp_hidden[0]}"
        )
    return dict(
        architectures=["SiglipVisionModel"],
        model_type="siglip_vision_model",
        **_common_json(cfg),
        intermediate_size=cfg.mlp_hidden[0],
        hidden_act=_HF_ACTIVATIONS[cfg.mlp_type],
        vision_use_head=True,
    )


def _resample_number(interpolation: str) -> int:
    """The PIL filter number an image processor's "resample" holds for an interpolation name."""
    return {name: number for number, name in _RESAMPLE.items()}[interpolation]


def _cropping_processor(processor: str, preprocess: Preprocess, img_size: int) -> dict[str, Any]:
    """The inverse of hf_preprocess: the preprocessor_config.json of transformers' `processor`, an image processor
    that resizes the shorter side, center-crops, rescales by 1/255 and normalizes, giving the eval view."""
    return dict(
        image_processor_type=processor,
        do_convert_rgb=True,
        do_resize=True,
        size={"shortest_edge": preprocess.resize_size(img_size)},
        resample=_resample_number(preprocess.interpolation),
        do_center_crop=True,
        crop_size={"height": img_size, "width": img_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(preprocess.mean),
        image_std=list(preprocess.std),
    )


def _square_processor(preprocess: Preprocess, img_size: int) -> dict[str, Any]:
    """The inverse of hf_preprocess for SiglipImageProcessor: a resize straight to the square input, no crop."""
    return dict(
        image_processor_type="SiglipImageProcessor",
        do_convert_rgb=True,
        do_resize=True,
        size={"height": img_size, "width": img_size},
        resample=_resample_number(preprocess.interpolation),
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(preprocess.mean),
        image_std=list(preprocess.std),
    )


@dataclasses.dataclass(frozen=True)
class Export:
    """How a family is written as a transformers class: `config` gives the config.json (its architectures[0] names
    the class, and CLASSES reads it back); `processor` the preprocessor_config.json of a Preprocess at an image
    size; `prefixed` names the classes whose save_pretrained puts the tower under the family's torch_prefix (the
    entries of torch_beside stay beside it); `label` names the class in messages."""

    label: str
    config: Callable[[ModelConfig], dict[str, Any]]
    processor: Callable[[Preprocess, int], dict[str, Any]]
    prefixed: tuple[str, ...] = ()


# family -> how `export --format transformers` writes it (the inverse of CLASSES and hf_preprocess)
EXPORTS: dict[str, Export] = {
    "hf_dinov2": Export("Dinov2Model", _dinov2_json, functools.partial(_cropping_processor, "BitImageProcessor")),
    "hf_clip": Export(
        "CLIPVisionModel",
        _clip_json,
        functools.partial(_cropping_processor, "CLIPImageProcessor"),
        prefixed=("CLIPVisionModelWithProjection",),
    ),
    "hf_siglip": Export("SiglipVisionModel", _siglip_json, _square_processor),
}


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not readable JSON ({err})") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return data


def _folder(spec: str) -> str:
    return spec if os.path.isdir(spec) else os.path.dirname(spec) or "."


def hf_class(spec: str) -> str:
    """The class (architectures[0]) that the config.json beside the weights names; "" without one."""
    path = os.path.join(_folder(spec), CONFIG_FILE)
    return (_read_json(path).get("architectures") or [""])[0] if os.path.isfile(path) else ""


def has_hf_config(spec: str) -> bool:
    """The config.json beside the weights names a class this tool reads (it then wins over family= / arch=)."""
    return hf_class(spec) in CLASSES


def hf_layout(spec: str) -> tuple[str, ModelConfig]:
    """(family, ModelConfig) of a transformers checkpoint from the config.json beside its weights (and, for EvaCLIP,
    its tensor names); a one-line CheckpointError saying what to pass when there is none or it names a class that is
    not read."""
    path = os.path.join(_folder(spec), CONFIG_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{spec} has no {CONFIG_FILE} naming its class: pass --family and --arch (family= and arch=) "
            "for its layout and architecture"
        )
    config = _read_json(path)
    name = (config.get("architectures") or [""])[0]
    if name not in CLASSES:
        raise CheckpointError(
            f"{path} names {name or 'no class'!r} (model_type {config.get('model_type')!r}), which is not read: "
            f"known {', '.join(CLASSES)}; or pass --family and --arch for a layout this tool reads"
        )
    family, build = CLASSES[name]
    cfg = build(config, lambda: set(open_state_dict(spec)))
    return family, cfg.replace(name=os.path.basename(os.path.abspath(_folder(spec))))


def _clip_text(config: dict[str, Any], c: dict[str, Any]) -> dict[str, Any]:
    """CLIPModel's text-tower switches: the top-level projection_dim, and transformers' pooling rule (the argmax of
    the ids for the legacy eos_token_id 2, else the first eos_token_id)."""
    eos = c["eos_token_id"]
    if not isinstance(eos, int):
        raise UserError(f"text_config's eos_token_id {eos!r} is not read: CLIP pools the text at one end-of-text id")
    return dict(embed_dim=config.get("projection_dim", 512), eos_token=-1 if eos == 2 else eos)


def _siglip_text(config: dict[str, Any], c: dict[str, Any]) -> dict[str, Any]:
    """SiglipModel's and Siglip2Model's text-tower switches (Siglip2TextModel is SiglipTextModel): bidirectional,
    pooled at the last of its max_position_embeddings positions, a head with a bias (to projection_size, by default
    the width), sigmoid scoring."""
    embed_dim = c.get("projection_size") or c["hidden_size"]
    return dict(embed_dim=embed_dim, causal=False, pool="last", proj_bias=True, scoring="sigmoid")


# config.json classes whose text tower zero-shot, retrieval and finetune-text read: (text layout of
# io.text_convert, text_config defaults, the class's own TextConfig fields)
TEXT_CLASSES: dict[str, tuple[str, dict[str, Any], Callable[..., dict[str, Any]]]] = {
    "CLIPModel": ("hf_clip", _CLIP_TEXT, _clip_text),
    "SiglipModel": ("hf_siglip", _SIGLIP_TEXT, _siglip_text),
    "Siglip2Model": ("hf_siglip", _SIGLIP_TEXT, _siglip_text),  # Siglip2TextConfig's defaults are SigLIP's
}


def hf_text_config(spec: str) -> tuple[str, TextConfig] | None:
    """(layout, TextConfig named after the folder) of the text tower of a transformers directory or shard index
    whose config.json names a TEXT_CLASSES class (transformers' defaults filled in); None for a weights file, or
    a config.json naming no class (the weights are then read as an open_clip checkpoint); a one-line
    CheckpointError when it names a class without a text tower read here."""
    name = hf_class(spec) if os.path.isdir(spec) or spec.endswith(".index.json") else ""
    if not name:
        return None
    path = os.path.join(_folder(spec), CONFIG_FILE)
    accepted = f"give a transformers {' / '.join(TEXT_CLASSES)} directory or an open_clip / EVA-CLIP checkpoint"
    if name not in TEXT_CLASSES:
        raise CheckpointError(f"{path} names {name!r}, which holds no text tower read here: {accepted}")
    layout, defaults, switches = TEXT_CLASSES[name]
    config = _read_json(path)
    c = _sizes(config.get("text_config") or {}, defaults)
    width, hidden = c["hidden_size"], c["intermediate_size"]
    return layout, TextConfig(
        name=os.path.basename(os.path.abspath(_folder(spec))),
        vocab_size=c["vocab_size"],
        context_length=c["max_position_embeddings"],
        width=width,
        heads=c["num_attention_heads"],
        layers=c["num_hidden_layers"],
        # exact when width * ratio rounds back to intermediate_size, else half a unit over so int() gives it
        mlp_ratio=hidden / width if int(width * (hidden / width)) == hidden else (hidden + 0.5) / width,
        activation=_ACTIVATIONS[c["hidden_act"]],
        norm_eps=c["layer_norm_eps"],
        **switches(config, c),
    )


def hf_tokenizer_folder(spec: str) -> str | None:
    """The folder of a transformers CLIP checkpoint when it holds its tokenizer's vocabulary, else None."""
    folder = _folder(spec)
    return folder if hf_vocab_files(folder) else None


def _token(value: Any, default: str) -> str:
    """A special token of tokenizer_config.json: a string, or an AddedToken's {"content": ...}."""
    return value.get("content", default) if isinstance(value, dict) else value or default


def _tokenizer_settings(folder: str) -> dict[str, Any]:
    """tokenizer_config.json of a transformers directory, {} without one."""
    path = os.path.join(folder, TOKENIZER_CONFIG_FILE)
    return _read_json(path) if os.path.isfile(path) else {}


def sentencepiece_file(spec: str) -> str:
    """The SentencePiece model a SigLIP directory's tokenizer is read from: Gemma's tokenizer.model for a
    Siglip2Model, or a SiglipModel whose tokenizer_config.json names a GemmaTokenizer (SigLIP 2 at a fixed
    resolution), else SigLIP's spiece.model."""
    tokenizer_class = str(_tokenizer_settings(_folder(spec)).get("tokenizer_class") or "")
    gemma = hf_class(spec) == "Siglip2Model" or tokenizer_class.startswith("GemmaTokenizer")
    return GEMMA_FILE if gemma else SPIECE_FILE


def siglip_tokenizer(spec: str) -> SiglipTokenizer:
    """The SentencePiece tokenizer of a SiglipModel / Siglip2Model directory (sentencepiece_file): spiece.model with
    the eos / pad tokens and do_lower_case of tokenizer_config.json when there, or Gemma's tokenizer.model as
    _gemma_tokenizer reads it."""
    folder, name, file = _folder(spec), hf_class(spec), sentencepiece_file(spec)
    path = os.path.join(folder, file)
    if not os.path.isfile(path):
        also = f" ({TOKENIZER_FILE} alone is not read)" if os.path.isfile(os.path.join(folder, TOKENIZER_FILE)) else ""
        raise FileNotFoundError(
            f"{folder} has no {file}: {name}'s SentencePiece tokenizer is read from it{also}; copy it beside "
            f"{CONFIG_FILE} from the model's Hub repository"
        )
    settings = _tokenizer_settings(folder)
    if file == GEMMA_FILE:
        return _gemma_tokenizer(folder, path, settings, lower=name == "Siglip2Model")
    eos, pad = _token(settings.get("eos_token"), "</s>"), _token(settings.get("pad_token"), "</s>")
    lower = settings.get("do_lower_case", True)
    return SiglipTokenizer(path, eos=eos, pad=pad, clean=functools.partial(siglip_clean, lower=lower))


def _gemma_tokenizer(folder: str, path: str, settings: dict[str, Any], lower: bool) -> SiglipTokenizer:
    """Gemma's tokenizer.model as transformers 5 reads it: for a Siglip2Model as Siglip2Tokenizer, lower case
    (`lower`: SigLIP 2 was trained on lower-cased text), for a SiglipModel as GemmaTokenizer, as typed (transformers 5
    rebuilds Gemma's normalizer, whatever tokenizer.json says); nothing else cleaned. BOS / EOS where tokenizer.json's
    post-processor template puts special tokens around the text (transformers 5 then ignores tokenizer_config.json's
    add_bos_token / add_eos_token), else as those two say (an absent one off); padded on the padding_side of
    tokenizer_config.json, else of tokenizer.json's padding, else transformers' default (left)."""
    file = os.path.join(folder, TOKENIZER_FILE)
    fast = _read_json(file) if os.path.isfile(file) else {}
    template = (fast.get("post_processor") or {}).get("single") or []
    if template:
        bos, eos = ("SpecialToken" in template[0]), ("SpecialToken" in template[-1])
    else:
        bos, eos = settings.get("add_bos_token", False), settings.get("add_eos_token", False)
    side = settings.get("padding_side") or (fast.get("padding") or {}).get("direction", "left").lower()
    return SiglipTokenizer(
        path,
        eos=_token(settings.get("eos_token"), "<eos>") if eos else None,
        pad=_token(settings.get("pad_token"), "<pad>"),
        clean=str.lower if lower else str,
        bos=_token(settings.get("bos_token"), "<bos>") if bos else None,
        padding_side=side,
    )


def hf_preprocess(spec: str) -> Preprocess | None:
    """The image processor's mean, std, crop fraction, filter and resize (preprocessor_config.json), or None without
    one."""
    path = os.path.join(_folder(spec), PREPROCESSOR_FILE)
    if not os.path.isfile(path):
        return None
    p = _read_json(path)
    size, crop = p.get("size") or {}, p.get("crop_size") or {}
    short = size.get("shortest_edge") if isinstance(size, dict) else size
    crop = crop.get("height") if isinstance(crop, dict) else crop
    crop_pct = crop / short if p.get("do_center_crop") and crop and short else 1.0
    interpolation = _RESAMPLE.get(p.get("resample"), "bicubic")
    # SiglipImageProcessor: size {"height": S, "width": S} and no crop, a resize straight to S x S
    square = isinstance(size, dict) and size.get("height") and size.get("height") == size.get("width")
    resize = "square" if square and not p.get("do_center_crop") else "shorter"
    try:
        return Preprocess(
            p["image_mean"], p["image_std"], crop_pct=crop_pct, interpolation=interpolation, resize=resize
        )
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{path} has no usable image_mean / image_std ({err})") from err
