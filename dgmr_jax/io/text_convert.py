"""text_from_torch / text_to_torch: the text tower of a full CLIP / SigLIP checkpoint <-> (TextConfig, params).

Zero-shot and retrieval need the original text tower beside the (pruned) vision tower. Two layouts (LAYOUTS):
open_clip's CLIP keeps it at the top level of the state dict (token_embedding, transformer.resblocks.*, ln_final,
text_projection); CustomTextCLIP (EVA02-E-14-plus) and EVA-CLIP keep it under "text.". transformers' SiglipModel
("hf_siglip") keeps it under "text_model." (separate q/k/v, final_layer_norm, a head Linear with a bias). Keys under
"visual." / "vision_model." belong to the vision tower (`from_torch`), derived buffers (the causal `attn_mask`,
transformers' `position_ids`) are rebuilt, logit_scale (and SigLIP's logit_bias) is kept.
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

LAYOUTS = ("open_clip", "hf_siglip")
VISION_PREFIXES = ("visual.", "vision_model.")
TEXT_PREFIX = "text."  # CustomTextCLIP / EVA-CLIP
DERIVED = ("attn_mask", "text_model.embeddings.position_ids")
TOP_LEVEL = ("logit_scale", "logit_bias")  # stay outside "text." in the CustomTextCLIP layout
_HINTS = {
    "open_clip": "It holds no CLIP text tower: pass the full open_clip checkpoint (with token_embedding.weight, "
    "transformer.resblocks.*, text_projection), not an exported vision tower.",
    "hf_siglip": "It holds no SigLIP text tower: pass a transformers SiglipModel directory (with text_model.*), "
    "not a SiglipVisionModel.",
}


def text_rules(cfg: TextConfig, layout: str = "open_clip") -> list[Rule]:
    """Torch names of the text tower in `layout` (LAYOUTS) <-> flax paths of models/text.py, for cfg's layers."""
    if layout not in LAYOUTS:
        raise CheckpointError(f"unknown text layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if layout == "hf_siglip":
        return _siglip_rules(cfg)
    out = [Rule(("token_embed",), ("token_embedding.weight",)), Rule(("pos_embed",), ("positional_embedding",))]
    for i in range(cfg.layers):
        f, t = f"blocks_{i}", f"transformer.resblocks.{i}."
        out += norm_rules(f"{f}/norm1", t + "ln_1")
        out += [
            Rule((f"{f}/attn/qkv/kernel",), (t + "attn.in_proj_weight",), "linear"),
            Rule((f"{f}/attn/qkv/bias",), (t + "attn.in_proj_bias",)),
        ]
        out += linear_rules(f"{f}/attn/proj", t + "attn.out_proj") + norm_rules(f"{f}/norm2", t + "ln_2")
        out += linear_rules(f"{f}/mlp/fc1", t + "mlp.c_fc") + linear_rules(f"{f}/mlp/fc2", t + "mlp.c_proj")
    # text_projection is stored (width, embed_dim), already the flax kernel layout
    out += [Rule(("proj/kernel",), ("text_projection",)), Rule(("logit_scale",), ("logit_scale",))]
    return out + norm_rules("norm", "ln_final")


def _siglip_rules(cfg: TextConfig) -> list[Rule]:
    """transformers' SiglipTextModel under "text_model." (its encoder layers named as the vision towers'), and
    SiglipModel's logit_scale and logit_bias, stored with shape (1,)."""
    n, out = HF_ENCODER, [Rule(("token_embed",), ("text_model.embeddings.token_embedding.weight",))]
    out.append(Rule(("pos_embed",), ("text_model.embeddings.position_embedding.weight",)))
    for i in range(cfg.layers):
        f, t = f"blocks_{i}", "text_model." + n["block"].format(i=i)
        out += norm_rules(f"{f}/norm1", t + n["norm1"])
        out += [
            Rule((f"{f}/attn/qkv/kernel",), (t + n["q_w"], t + n["k_w"], t + n["v_w"]), "qkv"),
            Rule((f"{f}/attn/qkv/bias",), (t + n["q_b"], t + n["k_b"], t + n["v_b"]), "qkv"),
        ]
        out += linear_rules(f"{f}/attn/proj", t + n["proj"]) + norm_rules(f"{f}/norm2", t + n["norm2"])
        out += linear_rules(f"{f}/mlp/fc1", t + "mlp.fc1") + linear_rules(f"{f}/mlp/fc2", t + "mlp.fc2")
    out += norm_rules("norm", "text_model.final_layer_norm") + linear_rules("proj", "text_model.head")
    return out + [Rule((name,), (name,), "scalar") for name in TOP_LEVEL]


def _text_names(sd: Mapping[str, Any]) -> dict[str, str]:
    """{name in the CLIP layout: name in sd} for every key outside the vision tower, derived buffers dropped."""
    prefix = TEXT_PREFIX if any(k.startswith(TEXT_PREFIX) for k in sd) else ""
    names = {}
    for key in sd:
        name = key[len(prefix) :] if prefix and key.startswith(prefix) else key
        if not key.startswith(VISION_PREFIXES) and name not in DERIVED:
            names[name] = key
    return names


def text_from_torch(
    src: str | os.PathLike | Mapping[str, Any], arch: str | TextConfig, layout: str = "open_clip"
) -> tuple[TextConfig, Params]:
    """Import the text tower of a CLIP / SigLIP checkpoint (path or mapping) in `layout` as (TextConfig, params).

    arch: a text preset (dgmr_jax.models.TEXT_PRESETS), a TextConfig .json, or a TextConfig. Strict: missing,
    unexpected and mis-shaped text keys raise one CheckpointError naming them. Arrays keep the checkpoint's
    dtype, so text_to_torch(*text_from_torch(sd)) reproduces the text entries of sd bit for bit.
    """
    cfg = resolve_text_config(arch)
    table, shapes = text_rules(cfg, layout), flatten(text_param_shapes(cfg))
    unheld = sorted(set(shapes) - {path for rule in table for path in rule.flax})
    if unheld:
        held = f"which the {layout} layout does not hold"
        raise CheckpointError(f"text tower {cfg.name!r} has {', '.join(unheld)}, {held}")
    raw = open_state_dict(src)
    sd = RenamedEntries(raw, _text_names(raw))
    problems = check_keys(sd, table)
    flat, misshaped = convert_rules(sd, table, shapes)
    if misshaped:
        problems.append(listing("mis-shaped keys", misshaped))
    if problems:
        hint = "" if table[0].torch[0] in sd else "\n" + _HINTS[layout]
        raise CheckpointError(f"checkpoint does not match text tower {cfg.name!r}:\n" + "\n".join(problems) + hint)
    return cfg, unflatten(flat)


def text_to_torch(
    cfg: TextConfig, params: Params, prefix: str = "", layout: str = "open_clip"
) -> dict[str, np.ndarray]:
    """Export text-tower params to `layout` {name: np.ndarray}; `prefix` ("text." for CustomTextCLIP) goes
    before every tower name, logit_scale (and logit_bias) stay at the top level."""
    sd = export_rules(flatten(params), text_rules(cfg, layout), cfg.name)
    return {(name if name in TOP_LEVEL else prefix + name): value for name, value in sd.items()}
