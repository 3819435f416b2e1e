"""text_from_torch / text_to_torch: the text tower of a full open_clip CLIP checkpoint <-> (TextConfig, params).

Zero-shot and retrieval need the original text tower beside the (pruned) vision tower. open_clip's CLIP keeps
it at the top level of the state dict (token_embedding, transformer.resblocks.*, ln_final, text_projection);
CustomTextCLIP (EVA02-E-14-plus) and EVA-CLIP keep it under "text.". Keys under "visual." belong to the
vision tower (`from_torch`), the causal `attn_mask` buffer is rebuilt from the config, logit_scale is kept.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from dgmr_jax.io.checkpoint_io import CheckpointError, open_state_dict
from dgmr_jax.io.convert import RenamedEntries, check_keys, convert_rules, export_rules, listing
from dgmr_jax.io.keymaps import Rule, linear_rules, norm_rules
from dgmr_jax.models.text import TextConfig, resolve_text_config, text_param_shapes
from dgmr_jax.models.tree import Params, flatten, unflatten

VISION_PREFIX = "visual."
TEXT_PREFIX = "text."  # CustomTextCLIP / EVA-CLIP
DERIVED = ("attn_mask",)
TOP_LEVEL = ("logit_scale",)  # stays outside "text." in the CustomTextCLIP layout


def text_rules(cfg: TextConfig) -> list[Rule]:
    """Torch names of open_clip's CLIP text tower <-> flax paths of models/text.py, for cfg's layers."""
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


def _text_names(sd: Mapping[str, Any]) -> dict[str, str]:
    """{name in the CLIP layout: name in sd} for every key outside the vision tower, derived buffers dropped."""
    prefix = TEXT_PREFIX if any(k.startswith(TEXT_PREFIX) for k in sd) else ""
    names = {}
    for key in sd:
        name = key[len(prefix) :] if prefix and key.startswith(prefix) else key
        if not key.startswith(VISION_PREFIX) and name not in DERIVED:
            names[name] = key
    return names


def text_from_torch(src: str | os.PathLike | Mapping[str, Any], arch: str | TextConfig) -> tuple[TextConfig, Params]:
    """Import the text tower of an open_clip CLIP checkpoint (path or mapping) as (TextConfig, Flax params).

    arch: a text preset (dgmr_jax.models.TEXT_PRESETS), a TextConfig .json, or a TextConfig. Strict: missing,
    unexpected and mis-shaped text keys raise one CheckpointError naming them. Arrays keep the checkpoint's
    dtype, so text_to_torch(*text_from_torch(sd)) reproduces the text entries of sd bit for bit.
    """
    cfg = resolve_text_config(arch)
    raw = open_state_dict(src)
    sd = RenamedEntries(raw, _text_names(raw))
    table = text_rules(cfg)
    problems = check_keys(sd, table)
    flat, misshaped = convert_rules(sd, table, flatten(text_param_shapes(cfg)))
    if misshaped:
        problems.append(listing("mis-shaped keys", misshaped))
    if problems:
        hint = ""
        if "token_embedding.weight" not in sd:
            hint = (
                "\nIt holds no CLIP text tower: pass the full open_clip checkpoint (with token_embedding.weight, "
                "transformer.resblocks.*, text_projection), not an exported vision tower."
            )
        raise CheckpointError(f"checkpoint does not match text tower {cfg.name!r}:\n" + "\n".join(problems) + hint)
    return cfg, unflatten(flat)


def text_to_torch(cfg: TextConfig, params: Params, prefix: str = "") -> dict[str, np.ndarray]:
    """Export text-tower params to open_clip's CLIP layout {name: np.ndarray}; `prefix` ("text." for
    CustomTextCLIP) goes before every tower name, logit_scale stays at the top level."""
    sd = export_rules(flatten(params), text_rules(cfg), cfg.name)
    return {(name if name in TOP_LEVEL else prefix + name): value for name, value in sd.items()}
