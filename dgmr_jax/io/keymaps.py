"""Declarative key maps: which PyTorch state-dict entries become which Flax params, per family.

A family is a table of torch names for the parts of a ViT; `rules(cfg, family)` expands it into
Rule rows for the config's layers and options. Layout hooks live in hooks.py.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

from dgmr_jax.core.errors import UserError
from dgmr_jax.models.config import ModelConfig

FAMILIES = (
    *("timm", "open_clip", "eva_clip", "dinov2", "internvit"),
    *("hf_dinov2", "hf_clip", "hf_siglip", "hf_siglip2", "hf_evaclip"),
)
_SIGLIPS = ("hf_siglip", "hf_siglip2")


@dataclasses.dataclass(frozen=True)
class Rule:
    """torch entries <-> flax param paths ("blocks_0/attn/qkv/kernel"), converted by HOOKS[hook]."""

    flax: tuple[str, ...]
    torch: tuple[str, ...]
    hook: str = "copy"


# Torch names of each part; "{b}" is the block prefix. Entries absent from a family fall back to _TIMM. Layout
# switches: fused (one qkv Linear, else cfg.qkv_fused decides), q_b/k_b/v_b (separate q/k/v biases), the hooks
# of the class token, position table and projection (cls_hook, pos_hook, proj_hook; "copy" when absent).
_TIMM = dict(
    block="blocks.{i}.",
    patch="patch_embed.proj",
    cls="cls_token",
    dist="dist_token",
    reg="reg_token",
    pos="pos_embed",
    norm_pre="norm_pre",
    norm="norm",
    fc_norm="fc_norm",
    head="head",
    head_dist="head_dist",
    norm1="norm1",
    norm2="norm2",
    qkv_w="attn.qkv.weight",
    qkv_b="attn.qkv.bias",
    q_w="attn.q_proj.weight",
    k_w="attn.k_proj.weight",
    v_w="attn.v_proj.weight",
    q_bias="attn.q_bias",
    v_bias="attn.v_bias",
    attn_norm="attn.norm",
    q_norm="attn.q_norm",
    k_norm="attn.k_norm",
    proj="attn.proj",
    ls1="ls1.gamma",
    ls2="ls2.gamma",
    fc1="mlp.fc1",
    fc2="mlp.fc2",
    fc1_g="mlp.fc1_g",
    fc1_x="mlp.fc1_x",
    mlp_norm="mlp.norm",
    mask="mask_token",
    # the attention pool (global_pool="map"): timm's AttentionPoolLatent
    pool_latent="attn_pool.latent",
    pool_q="attn_pool.q",
    pool_kv="attn_pool.kv",
    pool_proj="attn_pool.proj",
    pool_norm="attn_pool.norm",
    pool_fc1="attn_pool.mlp.fc1",
    pool_fc2="attn_pool.mlp.fc2",
)
_TIMM_EVA = dict(_TIMM, ls1="gamma_1", ls2="gamma_2", q_proj_bias=True)
# the encoder layers of transformers' CLIP and SigLIP vision towers (their MLP is fc1/fc2, as timm's)
HF_ENCODER = dict(
    block="encoder.layers.{i}.",
    norm1="layer_norm1",
    norm2="layer_norm2",
    q_w="self_attn.q_proj.weight",
    k_w="self_attn.k_proj.weight",
    v_w="self_attn.v_proj.weight",
    q_b="self_attn.q_proj.bias",
    k_b="self_attn.k_proj.bias",
    v_b="self_attn.v_proj.bias",
    proj="self_attn.out_proj",
)
_NAMES = {
    "timm": _TIMM,
    "open_clip": dict(
        _TIMM,
        prefix="visual.",
        fused=True,
        cls_hook="vector",
        pos_hook="rows",
        block="transformer.resblocks.{i}.",
        patch="conv1",
        cls="class_embedding",
        pos="positional_embedding",
        norm_pre="ln_pre",
        norm="ln_post",
        norm1="ln_1",
        norm2="ln_2",
        qkv_w="attn.in_proj_weight",
        qkv_b="attn.in_proj_bias",
        proj="attn.out_proj",
        ls1="ls_1.gamma",
        ls2="ls_2.gamma",
        fc1="mlp.c_fc",
        fc2="mlp.c_proj",
    ),
    "eva_clip": dict(
        _TIMM,
        prefix="visual.",
        attn_norm="attn.inner_attn_ln",
        ls1="gamma_1",
        ls2="gamma_2",
        fc1_g="mlp.w1",
        fc1_x="mlp.w2",
        mlp_norm="mlp.ffn_ln",
        gated_fc2="mlp.w3",
    ),
    "dinov2": dict(_TIMM, reg="register_tokens", packed_fc1="mlp.w12", gated_fc2="mlp.w3"),
    # OpenGVLab's remote-code InternVisionModel; inside an InternVL chat checkpoint it sits under "vision_model."
    "internvit": dict(
        _TIMM,
        prefix="vision_model.",
        block="encoder.layers.{i}.",
        patch="embeddings.patch_embedding",
        cls="embeddings.class_embedding",
        pos="embeddings.position_embedding",
        ls1="ls1",
        ls2="ls2",
    ),
    # transformers' Dinov2Model / Dinov2WithRegistersModel, as save_pretrained writes them (the Hub layout)
    "hf_dinov2": dict(
        _TIMM,
        fused=False,
        block="encoder.layer.{i}.",
        patch="embeddings.patch_embeddings.projection",
        cls="embeddings.cls_token",
        reg="embeddings.register_tokens",
        pos="embeddings.position_embeddings",
        mask="embeddings.mask_token",
        norm="layernorm",
        q_w="attention.attention.query.weight",
        k_w="attention.attention.key.weight",
        v_w="attention.attention.value.weight",
        q_b="attention.attention.query.bias",
        k_b="attention.attention.key.bias",
        v_b="attention.attention.value.bias",
        proj="attention.output.dense",
        ls1="layer_scale1.lambda1",
        ls2="layer_scale2.lambda1",
        packed_fc1="mlp.weights_in",
        gated_fc2="mlp.weights_out",
    ),
    # transformers' CLIPVisionModel / CLIPVisionModelWithProjection / CLIPModel: the tower under "vision_model."
    # (transformers 5 saves a bare CLIPVisionModel without it), its projection beside it
    "hf_clip": dict(
        _TIMM,
        prefix="vision_model.",
        beside=("visual_projection.weight",),
        fused=False,
        cls_hook="vector",
        pos_hook="rows",
        proj_hook="linear",
        patch="embeddings.patch_embedding",
        cls="embeddings.class_embedding",
        pos="embeddings.position_embedding.weight",
        norm_pre="pre_layrnorm",
        norm="post_layernorm",
        **HF_ENCODER,
        visual_proj="visual_projection.weight",
    ),
    # transformers' SiglipVisionModel / SiglipModel (also fixed-resolution SigLIP 2): the tower under "vision_model."
    # (transformers 5 saves a bare SiglipVisionModel without it); the pool's q, k, v packed in one in_proj
    "hf_siglip": dict(
        _TIMM,
        prefix="vision_model.",
        fused=False,
        pos_hook="rows",
        patch="embeddings.patch_embedding",
        pos="embeddings.position_embedding.weight",
        norm="post_layernorm",
        **HF_ENCODER,
        pool_latent="head.probe",
        pool_in_proj="head.attention.in_proj",
        pool_proj="head.attention.out_proj",
        pool_norm="head.layernorm",
        pool_fc1="head.mlp.fc1",
        pool_fc2="head.mlp.fc2",
    ),
}
# BAAI's remote-code EvaCLIPModel / EvaCLIPVisionModel(WithProjection) (EVA-CLIP-8B/18B on the Hub), as a port of
# its modeling_evaclip.py names them: CLIP's tower names, a patch bias, no pre-norm, q/k/v biases on q/k/v_proj,
# post_layernorm as the final norm and visual_projection (a Linear, with or without bias) as the head
_NAMES["hf_evaclip"] = dict(
    _NAMES["hf_clip"],
    beside=("visual_projection.weight", "visual_projection.bias"),
    q_proj_bias=True,
    head="visual_projection",
)
# transformers' Siglip2VisionModel / Siglip2Model at the fixed resolution of its position grid: SigLIP's names, the
# patch embedding a Linear on patches flattened (row, column, channel)
_NAMES["hf_siglip2"] = dict(_NAMES["hf_siglip"], patch_hook="patch_linear")

# Parts of a ViT that only some families' PyTorch models have: (what the model has, whether cfg has it, the
# families whose model holds it). Written in another family's layout, such a model loads into neither library.
_PARTS: tuple[tuple[str, Callable[[ModelConfig], bool], tuple[str, ...]], ...] = (
    ("per-layer attention units (a UVC slim model)", lambda c: not c.full_units, ("timm",)),
    (
        "a patch-embedding bias",
        lambda c: c.patch_bias,
        ("timm", "eva_clip", "dinov2", "internvit", "hf_dinov2", *_SIGLIPS, "hf_evaclip"),
    ),
    ("no patch-embedding bias", lambda c: not c.patch_bias, ("timm", "open_clip", "hf_clip")),
    ("a class token", lambda c: c.class_token, tuple(f for f in FAMILIES if f not in _SIGLIPS)),
    ("no class token", lambda c: not c.class_token, ("timm", *_SIGLIPS)),
    ("a distillation token", lambda c: c.dist_token, ("timm",)),
    ("register tokens", lambda c: c.reg_tokens > 0, ("timm", "dinov2", "hf_dinov2")),
    (
        "position embeddings on other prefix tokens than the class token",
        lambda c: c.pos_embed_prefix != int(c.class_token),
        ("timm",),
    ),
    ("a norm after the embeddings (ln_pre)", lambda c: c.pre_norm, ("timm", "open_clip", "hf_clip")),
    (
        "a final norm",
        lambda c: c.final_norm,
        ("timm", "open_clip", "eva_clip", "dinov2", "hf_dinov2", "hf_clip", *_SIGLIPS, "hf_evaclip"),
    ),
    ("no final norm", lambda c: not c.final_norm, ("timm", "eva_clip", "internvit")),
    ("a norm of the pooled vector (fc_norm)", lambda c: c.fc_norm, ("timm", "eva_clip")),
    ("average pooling", lambda c: c.global_pool == "avg", ("timm", "open_clip", "eva_clip")),
    ("an attention pool (global_pool='map')", lambda c: c.global_pool == "map", ("timm", *_SIGLIPS)),
    ("no attention pool", lambda c: c.global_pool != "map", tuple(f for f in FAMILIES if f not in _SIGLIPS)),
    ("a classification head", lambda c: c.num_classes > 0, ("timm", "eva_clip", "hf_evaclip")),
    ("a bias-free projection (proj)", lambda c: c.proj_dim > 0, ("open_clip", "hf_clip")),
    (
        "a q/k/v bias",
        lambda c: c.qkv_bias == "full",
        ("timm", "open_clip", "dinov2", "internvit", "hf_dinov2", "hf_clip", *_SIGLIPS, "hf_evaclip"),
    ),
    ("q and v biases only", lambda c: c.qkv_bias == "qv", ("timm", "eva_clip", "hf_evaclip")),
    (
        "no q/k/v bias",
        lambda c: c.qkv_bias == "none",
        ("timm", "eva_clip", "internvit", "hf_dinov2", "hf_evaclip"),
    ),
    ("q/k norms", lambda c: bool(c.qk_norm), ("internvit",)),
    ("an attention-output norm", lambda c: c.attn_norm, ("timm", "eva_clip")),
    (
        "no layer scale",
        lambda c: not c.layer_scale,
        ("timm", "open_clip", "eva_clip", "dinov2", "hf_clip", *_SIGLIPS, "hf_evaclip"),  # Dinov2Layer always scales
    ),
    ("layer scale", lambda c: c.layer_scale, ("timm", "open_clip", "eva_clip", "dinov2", "internvit", "hf_dinov2")),
    ("post-norm blocks", lambda c: c.post_norm, ("timm", "eva_clip", "hf_evaclip")),
    ("RMSNorm", lambda c: c.norm == "rmsnorm", ("timm", "eva_clip", "internvit", "hf_evaclip")),
    (
        "QuickGELU",
        lambda c: c.mlp_type == "quick_gelu",
        ("timm", "open_clip", "hf_clip", *_SIGLIPS, "hf_evaclip"),
    ),
    ("tanh-approximate GELU", lambda c: c.mlp_type == "gelu_tanh", ("timm", "hf_clip", *_SIGLIPS, "hf_evaclip")),
    ("a SwiGLU MLP", lambda c: c.gated, ("timm", "eva_clip", "dinov2", "hf_dinov2")),
    ("an MLP norm", lambda c: c.mlp_norm, ("timm", "eva_clip")),
    ("rotary position embeddings", lambda c: c.rope, ("timm", "eva_clip")),
)


def foreign_parts(cfg: ModelConfig, family: str) -> list[str]:
    """What cfg has that family's PyTorch model cannot hold (empty: cfg exports to that layout)."""
    return [what for what, has, holders in _PARTS if has(cfg) and family not in holders]


def export_families(cfg: ModelConfig) -> list[str]:
    """The families whose PyTorch model holds every part of cfg."""
    return [family for family in FAMILIES if not foreign_parts(cfg, family)]


# Buffers that some checkpoints carry but that are recomputed from the config (never learned).
DERIVED = {
    "eva_clip": re.compile(r"(^|\.)rope\.freqs_(cos|sin)$"),
    "hf_clip": re.compile(r"(^|\.)position_ids$"),  # transformers 4 saved CLIP's position index buffer
    "hf_evaclip": re.compile(r"(^|\.)position_ids$"),
}


def torch_prefix(family: str) -> str:
    """Prefix of the vision tower inside a full checkpoint ("visual." for CLIP layouts)."""
    return _NAMES[family].get("prefix", "")


def torch_beside(family: str) -> tuple[str, ...]:
    """Entries of the vision tower that sit beside its prefix, not under it (CLIPModel's visual_projection)."""
    return _NAMES[family].get("beside", ())


def family_names(cfg: ModelConfig, family: str) -> dict[str, str]:
    if family not in FAMILIES:
        raise UserError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    if family == "timm" and cfg.qkv_bias == "qv":  # timm's Eva class: gamma_1/gamma_2 layer scale
        return _TIMM_EVA
    return _NAMES[family]


def linear_rules(flax: str, torch: str, bias: bool = True) -> list[Rule]:
    """A Linear: torch <name>.weight (out, in) -> flax <path>/kernel (in, out), and its bias."""
    out = [Rule((f"{flax}/kernel",), (f"{torch}.weight",), "linear")]
    return out + [Rule((f"{flax}/bias",), (f"{torch}.bias",))] if bias else out


def norm_rules(flax: str, torch: str, bias: bool = True) -> list[Rule]:
    """A LayerNorm: torch weight / bias -> flax scale / bias; an RMSNorm (bias=False): the weight alone."""
    out = [Rule((f"{flax}/scale",), (f"{torch}.weight",))]
    return out + [Rule((f"{flax}/bias",), (f"{torch}.bias",))] if bias else out


def _norm(cfg: ModelConfig, flax: str, torch: str) -> list[Rule]:
    """A norm of kind cfg.norm."""
    return norm_rules(flax, torch, bias=cfg.norm == "layernorm")


def _attention(cfg: ModelConfig, n: dict[str, str], f: str, t: str) -> list[Rule]:
    fused = n.get("fused", cfg.qkv_fused)
    if fused:
        rules = [Rule((f"{f}/qkv/kernel",), (t + n["qkv_w"],), "linear")]
    else:
        rules = [Rule((f"{f}/qkv/kernel",), (t + n["q_w"], t + n["k_w"], t + n["v_w"]), "qkv")]
    if cfg.qkv_bias == "full" and not fused and "q_b" in n:
        rules.append(Rule((f"{f}/qkv/bias",), (t + n["q_b"], t + n["k_b"], t + n["v_b"]), "qkv"))
    elif cfg.qkv_bias == "full":
        rules.append(Rule((f"{f}/qkv/bias",), (t + n["qkv_b"],)))
    elif cfg.qkv_bias == "qv":
        if not fused and n.get("q_proj_bias"):  # timm Eva unfused: biases live on q_proj / v_proj
            q_bias, v_bias = n["q_w"].replace("weight", "bias"), n["v_w"].replace("weight", "bias")
        else:
            q_bias, v_bias = n["q_bias"], n["v_bias"]
        rules += [Rule((f"{f}/q_bias",), (t + q_bias,)), Rule((f"{f}/v_bias",), (t + v_bias,))]
    if cfg.qk_norm:
        rules += norm_rules(f"{f}/q_norm", t + n["q_norm"], bias=False)
        rules += norm_rules(f"{f}/k_norm", t + n["k_norm"], bias=False)
    if cfg.attn_norm:
        rules += _norm(cfg, f"{f}/norm", t + n["attn_norm"])
    return rules + linear_rules(f"{f}/proj", t + n["proj"])


def _mlp(cfg: ModelConfig, n: dict[str, str], f: str, t: str) -> list[Rule]:
    fc2 = n.get("gated_fc2", n["fc2"]) if cfg.gated else n["fc2"]
    if not cfg.gated:
        rules = linear_rules(f"{f}/fc1", t + n["fc1"])
    elif cfg.mlp_packed:
        packed = t + n.get("packed_fc1", n["fc1"])
        rules = [
            Rule((f"{f}/fc1_g/kernel", f"{f}/fc1_x/kernel"), (f"{packed}.weight",), "packed"),
            Rule((f"{f}/fc1_g/bias", f"{f}/fc1_x/bias"), (f"{packed}.bias",), "packed"),
        ]
    else:
        rules = linear_rules(f"{f}/fc1_g", t + n["fc1_g"]) + linear_rules(f"{f}/fc1_x", t + n["fc1_x"])
    if cfg.mlp_norm:
        rules += _norm(cfg, f"{f}/norm", t + n["mlp_norm"])
    return rules + linear_rules(f"{f}/fc2", t + fc2)


def _block(cfg: ModelConfig, n: dict[str, str], i: int) -> list[Rule]:
    """Block i's rules; a branch a UVC slim layer does not have (0 heads, 0 MLP neurons) has none."""
    f, t = f"blocks_{i}", n["block"].format(i=i)
    rules = []
    if cfg.heads(i):
        rules += _norm(cfg, f"{f}/norm1", t + n["norm1"]) + _attention(cfg, n, f"{f}/attn", t)
    if cfg.mlp_hidden[i]:
        rules += _norm(cfg, f"{f}/norm2", t + n["norm2"]) + _mlp(cfg, n, f"{f}/mlp", t)
    if cfg.layer_scale:
        rules += [Rule((f"{f}/ls1/scale",), (t + n["ls1"],))] if cfg.heads(i) else []
        rules += [Rule((f"{f}/ls2/scale",), (t + n["ls2"],))] if cfg.mlp_hidden[i] else []
    return rules


def rules(cfg: ModelConfig, family: str) -> list[Rule]:
    """All rules for cfg in one family's layout, in unscanned form (blocks_0 ... blocks_{depth-1})."""
    n = family_names(cfg, family)
    out = [Rule(("patch_embed/kernel",), (f"{n['patch']}.weight",), n.get("patch_hook", "conv"))]
    if cfg.patch_bias:
        out.append(Rule(("patch_embed/bias",), (f"{n['patch']}.bias",)))
    if cfg.class_token:
        out.append(Rule(("cls_token",), (n["cls"],), n.get("cls_hook", "copy")))
    if cfg.dist_token:
        out.append(Rule(("dist_token",), (n["dist"],)))
    if cfg.reg_tokens:
        out.append(Rule(("reg_token",), (n["reg"],)))
    if cfg.mask_token:
        out.append(Rule(("mask_token",), (n["mask"],)))
    out.append(Rule(("pos_embed",), (n["pos"],), n.get("pos_hook", "copy")))
    if cfg.pre_norm:
        out += _norm(cfg, "norm_pre", n["norm_pre"])
    for i in range(cfg.depth):
        out += _block(cfg, n, i)
    if cfg.final_norm:
        out += _norm(cfg, "norm", n["norm"])
    if cfg.fc_norm:
        out += _norm(cfg, "fc_norm", n["fc_norm"])
    if cfg.num_classes:
        out += linear_rules("head", n["head"], bias=cfg.head_bias)
        if cfg.dist_token:
            out += linear_rules("head_dist", n["head_dist"], bias=cfg.head_bias)
    if cfg.global_pool == "map":
        out += _attention_pool(n)
    if cfg.proj_dim:
        out.append(Rule(("proj/kernel",), (n.get("visual_proj", "proj"),), n.get("proj_hook", "copy")))
    return out


def _attention_pool(n: dict[str, str]) -> list[Rule]:
    """The attention pool's rules: the probe, q and kv (packed as one in_proj of q, k, v rows in transformers'
    nn.MultiheadAttention), proj, the norm and the head's MLP."""
    rules = [Rule(("attn_pool/latent",), (n["pool_latent"],))]
    if "pool_in_proj" in n:
        packed = n["pool_in_proj"]
        rules += [
            Rule(("attn_pool/q/kernel", "attn_pool/kv/kernel"), (f"{packed}_weight",), "in_proj"),
            Rule(("attn_pool/q/bias", "attn_pool/kv/bias"), (f"{packed}_bias",), "in_proj"),
        ]
    else:
        rules += linear_rules("attn_pool/q", n["pool_q"]) + linear_rules("attn_pool/kv", n["pool_kv"])
    rules += linear_rules("attn_pool/proj", n["pool_proj"]) + norm_rules("attn_pool/norm", n["pool_norm"])
    return rules + linear_rules("attn_pool/fc1", n["pool_fc1"]) + linear_rules("attn_pool/fc2", n["pool_fc2"])
