"""What pairs a (pruned) CLIP vision tower with its original text tower: the image embedding of a vision
config, and the text tower (config checked against that embedding, params, tokenizer) of an open_clip /
EVA-CLIP checkpoint or of a transformers SiglipModel directory. Shared by `dgmr-jax eval` (zero-shot, retrieval)
and `dgmr-jax finetune-text`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from dgmr_jax.core.errors import UserError
from dgmr_jax.io.hf_config import hf_class, siglip_text_config, siglip_tokenizer
from dgmr_jax.models.config import ModelConfig
from dgmr_jax.models.text import TEXT_PRESETS, TextConfig, resolve_text_config
from dgmr_jax.models.tokenizer import Tokenizer


def clip_embedding(cfg: ModelConfig) -> tuple[str, int]:
    """(forward output, width) holding a vision tower's CLIP image embedding: open_clip's projected "pooled",
    the embedding head ("logits") of timm / EVA-CLIP towers, else the plain pooled features."""
    if cfg.proj_dim:
        return "pooled", cfg.proj_dim
    if cfg.num_classes:
        return "logits", cfg.num_classes
    return "pooled", cfg.width


def text_config_for(cfg: ModelConfig, text_arch: str | TextConfig | None = None) -> TextConfig:
    """The text tower's config: `text_arch` (a preset, a TextConfig .json, a TextConfig), by default the preset
    named like the vision model; its embed_dim must equal the vision tower's image embedding width."""
    arch = text_arch or (cfg.name if cfg.name in TEXT_PRESETS else None)
    if arch is None:
        raise UserError(
            f"model {cfg.name!r} has no text preset of that name: pass --text-arch "
            f"(one of {', '.join(sorted(TEXT_PRESETS))}, or a TextConfig .json)"
        )
    return check_embedding(cfg, resolve_text_config(arch))


def check_embedding(cfg: ModelConfig, text_cfg: TextConfig) -> TextConfig:
    """text_cfg, once its embed_dim is checked to equal the vision tower's image embedding width."""
    key, width = clip_embedding(cfg)
    if width != text_cfg.embed_dim:
        raise UserError(
            f"model {cfg.name!r} embeds images in {width} dims ({key}) but text tower {text_cfg.name!r} in "
            f"{text_cfg.embed_dim}: pass the --text-arch and --clip-text of the CLIP model the vision tower came from"
        )
    return text_cfg


def _siglip_class(checkpoint: str | os.PathLike | Mapping[str, Any]) -> bool:
    """Whether `checkpoint` is a transformers SiglipModel directory (or its weights file); a Siglip2Model's text
    tower, which has another tokenizer, is refused in one line."""
    name = hf_class(os.fspath(checkpoint)) if isinstance(checkpoint, (str, os.PathLike)) else ""
    if name == "Siglip2Model":
        raise UserError(
            f"{checkpoint} is a Siglip2Model, whose text tower (Gemma's tokenizer) is not read yet; zero-shot and "
            "retrieval read the text tower of an open_clip checkpoint or a transformers SiglipModel directory"
        )
    return name == "SiglipModel"


def open_text_tower(
    checkpoint: str | os.PathLike | Mapping[str, Any],
    cfg: ModelConfig,
    text_arch: str | TextConfig | None = None,
    bpe_vocab: str | None = None,
) -> tuple[TextConfig, Any, Any]:
    """(TextConfig checked against `cfg`'s image embedding, text params, tokenizer) of a CLIP checkpoint, or of a
    transformers SiglipModel directory (its config.json gives the tower, spiece.model the tokenizer). The config
    and tokenizer are checked before the checkpoint is read."""
    from dgmr_jax.io.text_convert import text_from_torch

    if _siglip_class(checkpoint):
        if text_arch or bpe_vocab:
            raise UserError(
                f"{checkpoint} is a SiglipModel directory, whose config.json and spiece.model give the text tower "
                "and its tokenizer: drop --text-arch and --bpe-vocab (they are for open_clip checkpoints)"
            )
        text_cfg = check_embedding(cfg, siglip_text_config(os.fspath(checkpoint)))
        tokenizer = siglip_tokenizer(os.fspath(checkpoint))
        return (*text_from_torch(checkpoint, text_cfg, layout="hf_siglip"), tokenizer)
    text_cfg = text_config_for(cfg, text_arch)
    tokenizer = Tokenizer(bpe_vocab)
    text_cfg, text_params = text_from_torch(checkpoint, text_cfg)
    return text_cfg, text_params, tokenizer
