"""text_from_torch / text_to_torch: the text tower of a full CLIP / SigLIP checkpoint <-> (TextConfig, params).

Zero-shot and retrieval need the original text tower beside the (pruned) vision tower. Three layouts (LAYOUTS),
told apart by their keys (text_layout): open_clip's CLIP keeps it at the top level of the state dict
(token_embedding, transformer.resblocks.*, ln_final, text_projection); CustomTextCLIP (EVA02-E-14-plus) and
EVA-CLIP keep it under "text.". transformers' CLIPModel ("hf_clip") keeps it under "text_model." (separate q/k/v
projections), with text_projection (a Linear) beside it; SiglipModel and Siglip2Model ("hf_siglip") keep it
all under "text_model.", its projection a head Linear with a bias. The vision tower's keys ("visual.", "vision_model.",
visual_projection) are `from_torch`'s, derived buffers (the causal `attn_mask`, transformers' `position_ids`) are
rebuilt, logit_scale (and SigLIP's logit_bias) is kept.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from dgmr_jax.io.checkpoint_io import CheckpointError, open_state_dict
from dgmr_jax.io.convert import RenamedEntries, check_keys, convert_rules, export_rules, listing
from dgmr_jax.io.keymaps import HF_ENCODER, Rule, linear_rules, norm_rules
from dgmr_jax.models.text import TextConfig, resolve_text_config, text_param_shapes
from dgmr_jax.models.tree import Params, flatten, unflatten

TEXT_PREFIX = "text."  # CustomTextCLIP / EVA-CLIP
TOP_LEVEL = ("logit_scale",)  # stays outside "text." in the CustomTextCLIP layout
# transformers' text towers (CLIPTextModel, SiglipTextModel, Siglip2TextModel): under "text_model.", encoder layers
# named as the vision towers' (HF_ENCODER), the position_ids buffer derived
_HF = dict(
    token="text_model.embeddings.token_embedding.weight",
    pos="text_model.embeddings.position_embedding.weight",
    block="text_model." + HF_ENCODER["block"],
    norm1=HF_ENCODER["norm1"],
    norm2=HF_ENCODER["norm2"],
    proj=HF_ENCODER["proj"],
    fc1="mlp.fc1",
    fc2="mlp.fc2",
    norm="text_model.final_layer_norm",
    head_hook="linear",
    head_bias=None,
    scalars=("logit_scale",),
    scalar_hook="copy",
    derived=("text_model.embeddings.position_ids",),
)
# per layout: torch names of the text tower's parts ("{i}": the layer), the projection (head: its weight, stored
# as the flax kernel with head_hook; head_bias: its bias, when the layout has one), the scalars beside the tower
# (stored as scalar_hook says), the vision tower's key prefixes, the derived buffers dropped on import, and the
# hint given when a checkpoint holds no text tower in that layout
_NAMES: dict[str, dict[str, Any]] = {
    "open_clip": dict(
        token="token_embedding.weight",
        pos="positional_embedding",
        block="transformer.resblocks.{i}.",
        norm1="ln_1",
        norm2="ln_2",
        proj="attn.out_proj",
        fc1="mlp.c_fc",
        fc2="mlp.c_proj",
        norm="ln_final",
        head="text_projection",  # stored (width, embed_dim), already the flax kernel layout
        head_hook="copy",
        head_bias=None,
        scalars=("logit_scale",),
        scalar_hook="copy",
        vision=("visual.",),
        derived=("attn_mask",),
        hint="It holds no CLIP text tower: pass the full open_clip checkpoint (with token_embedding.weight, "
        "transformer.resblocks.*, text_projection) or a transformers CLIPModel / SiglipModel / Siglip2Model "
        "directory, not an exported vision tower.",
    ),
    "hf_clip": dict(
        _HF,
        head="text_projection.weight",
        vision=("vision_model.", "visual_projection."),
        hint="It holds no CLIP text tower: pass a transformers CLIPModel directory (with text_model.*), "
        "not a CLIPVisionModel.",
    ),
    "hf_siglip": dict(
        _HF,
        head="text_model.head.weight",
        head_bias="text_model.head.bias",
        scalars=("logit_scale", "logit_bias"),
        scalar_hook="scalar",  # SiglipModel stores them with shape (1,)
        vision=("vision_model.",),
        hint="It holds no SigLIP text tower: pass a transformers SiglipModel / Siglip2Model directory (with "
        "text_model.*), not a SiglipVisionModel.",
    ),
}
LAYOUTS = tuple(_NAMES)


def _qkv_rules(f: str, t: str, layout: str) -> list[Rule]:
    """The fused qkv projection: open_clip's in_proj, or transformers' q_proj, k_proj, v_proj concatenated."""
    if layout == "open_clip":
        return [
            Rule((f"{f}/attn/qkv/kernel",), (t + "attn.in_proj_weight",), "linear"),
            Rule((f"{f}/attn/qkv/bias",), (t + "attn.in_proj_bias",)),
        ]
    n = HF_ENCODER
    return [
        Rule((f"{f}/attn/qkv/kernel",), (t + n["q_w"], t + n["k_w"], t + n["v_w"]), "qkv"),
        Rule((f"{f}/attn/qkv/bias",), (t + n["q_b"], t + n["k_b"], t + n["v_b"]), "qkv"),
    ]


def text_rules(cfg: TextConfig, layout: str = "open_clip") -> list[Rule]:
    """Torch names of the text tower in `layout` (LAYOUTS) <-> flax paths of models/text.py, for cfg's layers and
    the projection bias and logit_bias that cfg has (proj_bias, sigmoid scoring) and the layout holds."""
    if layout not in LAYOUTS:
        raise CheckpointError(f"unknown text tower layout {layout!r}; known: {', '.join(LAYOUTS)}")
    n = _NAMES[layout]
    out = [Rule(("token_embed",), (n["token"],)), Rule(("pos_embed",), (n["pos"],))]
    for i in range(cfg.layers):
        f, t = f"blocks_{i}", n["block"].format(i=i)
        out += norm_rules(f"{f}/norm1", t + n["norm1"]) + _qkv_rules(f, t, layout)
        out += linear_rules(f"{f}/attn/proj", t + n["proj"]) + norm_rules(f"{f}/norm2", t + n["norm2"])
        out += linear_rules(f"{f}/mlp/fc1", t + n["fc1"]) + linear_rules(f"{f}/mlp/fc2", t + n["fc2"])
    out += norm_rules("norm", n["norm"]) + [Rule(("proj/kernel",), (n["head"],), n["head_hook"])]
    if cfg.proj_bias and n["head_bias"]:
        out.append(Rule(("proj/bias",), (n["head_bias"],)))
    scalars = ("logit_scale", "logit_bias") if cfg.scoring == "sigmoid" else ("logit_scale",)
    return out + [Rule((name,), (name,), n["scalar_hook"]) for name in scalars if name in n["scalars"]]


def text_layout(sd: Mapping[str, Any]) -> tuple[str, str]:
    """(layout, prefix) of the text tower in sd, told by its keys: ("hf_siglip", "") for transformers'
    SiglipModel / Siglip2Model, ("hf_clip", "") for its CLIPModel, ("open_clip", "text.") for CustomTextCLIP /
    EVA-CLIP, else ("open_clip", "")."""
    if any(k.startswith("text_model.") for k in sd):
        return ("hf_siglip" if _NAMES["hf_siglip"]["head"] in sd else "hf_clip"), ""
    return "open_clip", TEXT_PREFIX if any(k.startswith(TEXT_PREFIX) for k in sd) else ""


def _text_names(sd: Mapping[str, Any], layout: str, prefix: str) -> dict[str, str]:
    """{name in the layout: name in sd} for every key outside the vision tower, derived buffers dropped."""
    n, names = _NAMES[layout], {}
    for key in sd:
        name = key[len(prefix) :] if prefix and key.startswith(prefix) else key
        if not key.startswith(n["vision"]) and name not in n["derived"]:
            names[name] = key
    return names


def text_from_torch(
    src: str | os.PathLike | Mapping[str, Any], arch: str | TextConfig, layout: str | None = None
) -> tuple[TextConfig, Params]:
    """Import the text tower of a CLIP / SigLIP checkpoint (path or mapping) in `layout` (LAYOUTS; default: the
    one its keys tell, text_layout) as (TextConfig, Flax params).

    arch: a text preset (dgmr_jax.models.TEXT_PRESETS), a TextConfig .json, or a TextConfig. Strict: missing,
    unexpected and mis-shaped text keys raise one CheckpointError naming them. Arrays keep the checkpoint's
    dtype, so text_to_torch(*text_from_torch(sd)) reproduces the text entries of sd bit for bit.
    """
    cfg = resolve_text_config(arch)
    raw = open_state_dict(src)
    found, prefix = text_layout(raw)
    layout = layout or found
    table, shapes = text_rules(cfg, layout), flatten(text_param_shapes(cfg))
    unheld = sorted(set(shapes) - {path for rule in table for path in rule.flax})
    if unheld:
        raise CheckpointError(
            f"text tower {cfg.name!r} has {', '.join(unheld)}, which the {layout} layout does not hold"
        )
    sd = RenamedEntries(raw, _text_names(raw, layout, prefix if layout == "open_clip" else ""))
    problems = check_keys(sd, table)
    flat, misshaped = convert_rules(sd, table, shapes)
    if misshaped:
        problems.append(listing("mis-shaped keys", misshaped))
    if problems:
        hint = "" if table[0].torch[0] in sd else "\n" + _NAMES[layout]["hint"]
        raise CheckpointError(f"checkpoint does not match text tower {cfg.name!r}:\n" + "\n".join(problems) + hint)
    return cfg, unflatten(flat)


def text_to_torch(
    cfg: TextConfig, params: Params, prefix: str = "", layout: str = "open_clip"
) -> dict[str, np.ndarray]:
    """Export text-tower params to `layout` (LAYOUTS) {name: np.ndarray}; `prefix` ("text." for CustomTextCLIP)
    goes before every tower name, logit_scale stays at the top level."""
    sd = export_rules(flatten(params), text_rules(cfg, layout), cfg.name)
    return {(name if name in TOP_LEVEL else prefix + name): value for name, value in sd.items()}
