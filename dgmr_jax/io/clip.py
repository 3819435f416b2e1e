"""What pairs a (pruned) CLIP vision tower with its original text tower: the image embedding of a vision
config, and the text tower (config checked against that embedding, params, tokenizer) that a text checkpoint
gives (text_source: an open_clip / EVA-CLIP checkpoint, a transformers CLIPModel, SiglipModel or Siglip2Model
directory).
Shared by `dgmr-jax eval` (zero-shot, retrieval) and `dgmr-jax finetune-text`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from dgmr_jax.core.errors import UserError
from dgmr_jax.io.hf_config import (
    hf_class,
    hf_text_config,
    hf_tokenizer_folder,
    sentencepiece_file,
    siglip_tokenizer,
)
from dgmr_jax.models.config import ModelConfig
from dgmr_jax.models.text import TEXT_PRESETS, TextConfig, resolve_text_config
from dgmr_jax.models.tokenizer import SiglipTokenizer, Tokenizer


def clip_embedding(cfg: ModelConfig) -> tuple[str, int]:
    """(forward output, width) holding a vision tower's CLIP image embedding: open_clip's projected "pooled",
    the embedding head ("logits") of timm / EVA-CLIP towers, else the plain pooled features."""
    if cfg.proj_dim:
        return "pooled", cfg.proj_dim
    if cfg.num_classes:
        return "logits", cfg.num_classes
    return "pooled", cfg.width


def check_embedding(cfg: ModelConfig, text_cfg: TextConfig) -> TextConfig:
    """text_cfg, once its embed_dim is checked to equal the vision tower's image embedding width."""
    key, width = clip_embedding(cfg)
    if width != text_cfg.embed_dim:
        raise UserError(
            f"model {cfg.name!r} embeds images in {width} dims ({key}) but text tower {text_cfg.name!r} in "
            f"{text_cfg.embed_dim}: pass the --text-arch and --clip-text of the CLIP model the vision tower came from"
        )
    return text_cfg


def _preset_config(cfg: ModelConfig, text_arch: str | TextConfig | None) -> TextConfig:
    """An open_clip text tower's config: `text_arch` (a preset, a TextConfig .json, a TextConfig), by default the
    preset named like the vision model."""
    arch = text_arch or (cfg.name if cfg.name in TEXT_PRESETS else None)
    if arch is None:
        raise UserError(
            f"model {cfg.name!r} has no text preset of that name: pass --text-arch "
            f"(one of {', '.join(sorted(TEXT_PRESETS))}, or a TextConfig .json)"
        )
    return resolve_text_config(arch)


def _clip_tokenizer(text_cfg: TextConfig, vocab: str | None) -> Tokenizer:
    """CLIP's BPE tokenizer of `vocab` (a bpe_simple_vocab_16e6.txt.gz or a transformers directory; default: the
    one open_clip_torch ships), refused when its ids do not fit the tower (vocab_size, the end-of-text id the
    tower pools at)."""
    tokenizer = Tokenizer(vocab)
    size, eos = max(tokenizer.ids.values()) + 1, text_cfg.eos_token
    if size > text_cfg.vocab_size or eos not in (-1, tokenizer.eot):
        pooled = "the largest id" if eos == -1 else eos
        raise UserError(
            f"the tokenizer ({size} ids, end of text {tokenizer.eot}) does not fit text tower {text_cfg.name!r} "
            f"(vocab_size {text_cfg.vocab_size}, pooled at {pooled}): give its vocabulary with "
            "--bpe-vocab (a bpe_simple_vocab_16e6.txt.gz, or a transformers directory with vocab.json + merges.txt)"
        )
    return tokenizer


def text_source(
    checkpoint: str | os.PathLike | Mapping[str, Any] | None,
    cfg: ModelConfig,
    text_arch: str | TextConfig | None = None,
    bpe_vocab: str | None = None,
) -> tuple[str | None, TextConfig, Tokenizer | SiglipTokenizer]:
    """(layout, TextConfig checked against `cfg`'s image embedding, tokenizer) that a text checkpoint gives, decided
    before its weights are read. A transformers CLIPModel directory: "hf_clip", its config.json, CLIP's BPE from
    its vocab.json + merges.txt or tokenizer.json (or bpe_vocab); a SiglipModel / Siglip2Model directory:
    "hf_siglip", its config.json, SentencePiece from its spiece.model / Gemma's tokenizer.model; anything else (an
    open_clip / EVA-CLIP checkpoint, a mapping, None for a random init): layout None (its keys tell it), `text_arch`
    (default: the preset named like the vision model), CLIP's BPE of bpe_vocab (default: the one open_clip_torch
    ships)."""
    spec = os.fspath(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else None
    found = hf_text_config(spec) if spec else None
    if found is None:
        text_cfg = check_embedding(cfg, _preset_config(cfg, text_arch))
        return None, text_cfg, _clip_tokenizer(text_cfg, bpe_vocab)
    layout, text_cfg = found
    if layout == "hf_siglip" and (text_arch or bpe_vocab):
        raise UserError(
            f"{spec} is a {hf_class(spec)} directory, whose config.json and {sentencepiece_file(spec)} give the text "
            "tower and its tokenizer: drop --text-arch and --bpe-vocab (they are for open_clip checkpoints)"
        )
    if text_arch:
        raise UserError(
            f"{spec} is a CLIPModel directory, whose config.json gives the text tower: drop --text-arch (it is for "
            "open_clip checkpoints)"
        )
    text_cfg = check_embedding(cfg, text_cfg)
    if layout == "hf_siglip":
        return layout, text_cfg, siglip_tokenizer(spec)
    return layout, text_cfg, _clip_tokenizer(text_cfg, bpe_vocab or hf_tokenizer_folder(spec))


def open_text_tower(
    checkpoint: str | os.PathLike | Mapping[str, Any],
    cfg: ModelConfig,
    text_arch: str | TextConfig | None = None,
    bpe_vocab: str | None = None,
) -> tuple[TextConfig, Any, Tokenizer | SiglipTokenizer]:
    """(TextConfig checked against `cfg`'s image embedding, text params, tokenizer) of a text checkpoint
    (text_source). The config and tokenizer are checked before the checkpoint is read."""
    from dgmr_jax.io.text_convert import text_from_torch

    layout, text_cfg, tokenizer = text_source(checkpoint, cfg, text_arch, bpe_vocab)
    text_cfg, text_params = text_from_torch(checkpoint, text_cfg, layout)
    return text_cfg, text_params, tokenizer
