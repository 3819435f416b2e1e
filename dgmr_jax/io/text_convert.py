"""text_from_torch / text_to_torch: the text tower of a full CLIP checkpoint <-> (TextConfig, params).

Zero-shot and retrieval need the original text tower beside the (pruned) vision tower. open_clip's CLIP keeps
it at the top level of the state dict (token_embedding, transformer.resblocks.*, ln_final, text_projection);
CustomTextCLIP (EVA02-E-14-plus) and EVA-CLIP keep it under "text.". Keys under "visual." belong to the
vision tower (`from_torch`), the causal `attn_mask` buffer is rebuilt from the config, logit_scale is kept.
transformers' CLIPModel (layout "hf_clip") keeps it under "text_model." (separate q/k/v projections), with
text_projection (a Linear) and logit_scale beside it; its vision_model.* and visual_projection are the vision
tower's, its position_ids buffer is derived.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from dgmr_jax.core.errors import UserError
from dgmr_jax.io.checkpoint_io import CheckpointError, open_state_dict
from dgmr_jax.io.convert import RenamedEntries, check_keys, convert_rules, export_rules, listing
from dgmr_jax.io.keymaps import Rule, linear_rules, norm_rules
from dgmr_jax.models.text import TextConfig, resolve_text_config, text_param_shapes
from dgmr_jax.models.tree import Params, flatten, unflatten

TEXT_PREFIX = "text."  # CustomTextCLIP / EVA-CLIP
TOP_LEVEL = ("logit_scale",)  # stays outside "text." in the CustomTextCLIP layout
# per layout: torch names of the text tower's parts ("{i}": the layer), the vision tower's key prefixes, the
# derived buffers dropped on import
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
        text_proj="text_projection",
        text_proj_hook="copy",
        vision=("visual.",),
        derived=("attn_mask",),
    ),
    "hf_clip": dict(
        token="text_model.embeddings.token_embedding.weight",
        pos="text_model.embeddings.position_embedding.weight",
        block="text_model.encoder.layers.{i}.",
        norm1="layer_norm1",
        norm2="layer_norm2",
        proj="self_attn.out_proj",
        fc1="mlp.fc1",
        fc2="mlp.fc2",
        norm="text_model.final_layer_norm",
        text_proj="text_projection.weight",
        text_proj_hook="linear",
        vision=("vision_model.", "visual_projection."),
        derived=("text_model.embeddings.position_ids",),
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
    q, k, v = (t + f"self_attn.{x}_proj" for x in "qkv")
    return [
        Rule((f"{f}/attn/qkv/{flax}",), (f"{q}.{name}", f"{k}.{name}", f"{v}.{name}"), "qkv")
        for flax, name in (("kernel", "weight"), ("bias", "bias"))
    ]


def text_rules(cfg: TextConfig, layout: str = "open_clip") -> list[Rule]:
    """Torch names of a CLIP text tower in `layout` (LAYOUTS) <-> flax paths of models/text.py, for cfg's layers."""
    if layout not in LAYOUTS:
        raise UserError(f"unknown text tower layout {layout!r}; known: {', '.join(LAYOUTS)}")
    n = _NAMES[layout]
    out = [Rule(("token_embed",), (n["token"],)), Rule(("pos_embed",), (n["pos"],))]
    for i in range(cfg.layers):
        f, t = f"blocks_{i}", n["block"].format(i=i)
        out += norm_rules(f"{f}/norm1", t + n["norm1"]) + _qkv_rules(f, t, layout)
        out += linear_rules(f"{f}/attn/proj", t + n["proj"]) + norm_rules(f"{f}/norm2", t + n["norm2"])
        out += linear_rules(f"{f}/mlp/fc1", t + n["fc1"]) + linear_rules(f"{f}/mlp/fc2", t + n["fc2"])
    # open_clip stores text_projection (width, embed_dim), already the flax kernel layout; transformers a Linear
    out += [Rule(("proj/kernel",), (n["text_proj"],), n["text_proj_hook"]), Rule(("logit_scale",), ("logit_scale",))]
    return out + norm_rules("norm", n["norm"])


def text_layout(sd: Mapping[str, Any]) -> tuple[str, str]:
    """(layout, prefix) of the text tower in sd: ("hf_clip", "") for transformers' CLIPModel, ("open_clip",
    "text.") for CustomTextCLIP / EVA-CLIP, else ("open_clip", "")."""
    if any(k.startswith("text_model.") for k in sd):
        return "hf_clip", ""
    return "open_clip", TEXT_PREFIX if any(k.startswith(TEXT_PREFIX) for k in sd) else ""


def _text_names(sd: Mapping[str, Any], layout: str, prefix: str) -> dict[str, str]:
    """{name in the layout: name in sd} for every key outside the vision tower, derived buffers dropped."""
    n, names = _NAMES[layout], {}
    for key in sd:
        name = key[len(prefix) :] if prefix and key.startswith(prefix) else key
        if not key.startswith(n["vision"]) and name not in n["derived"]:
            names[name] = key
    return names


def text_from_torch(src: str | os.PathLike | Mapping[str, Any], arch: str | TextConfig) -> tuple[TextConfig, Params]:
    """Import the text tower of an open_clip CLIP checkpoint or a transformers CLIPModel state dict (path or
    mapping; the layout is told by its keys, text_layout) as (TextConfig, Flax params).

    arch: a text preset (dgmr_jax.models.TEXT_PRESETS), a TextConfig .json, or a TextConfig. Strict: missing,
    unexpected and mis-shaped text keys raise one CheckpointError naming them. Arrays keep the checkpoint's
    dtype, so text_to_torch(*text_from_torch(sd)) reproduces the text entries of sd bit for bit.
    """
    cfg = resolve_text_config(arch)
    raw = open_state_dict(src)
    layout, prefix = text_layout(raw)
    sd = RenamedEntries(raw, _text_names(raw, layout, prefix))
    table = text_rules(cfg, layout)
    problems = check_keys(sd, table)
    flat, misshaped = convert_rules(sd, table, flatten(text_param_shapes(cfg)))
    if misshaped:
        problems.append(listing("mis-shaped keys", misshaped))
    if problems:
        hint = ""
        if _NAMES[layout]["token"] not in sd:
            hint = (
                "\nIt holds no CLIP text tower: pass the full open_clip checkpoint (with token_embedding.weight, "
                "transformer.resblocks.*, text_projection) or a transformers CLIPModel, not an exported vision tower."
            )
        raise CheckpointError(f"checkpoint does not match text tower {cfg.name!r}:\n" + "\n".join(problems) + hint)
    return cfg, unflatten(flat)


def text_to_torch(
    cfg: TextConfig, params: Params, prefix: str = "", layout: str = "open_clip"
) -> dict[str, np.ndarray]:
    """Export text-tower params to open_clip's CLIP layout (or transformers' CLIPModel, layout="hf_clip") {name:
    np.ndarray}; `prefix` ("text." for CustomTextCLIP) goes before every tower name, logit_scale stays at the top
    level."""
    sd = export_rules(flatten(params), text_rules(cfg, layout), cfg.name)
    return {(name if name in TOP_LEVEL else prefix + name): value for name, value in sd.items()}
