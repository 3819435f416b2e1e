"""What pairs a (pruned) CLIP vision tower with its original text tower: the image embedding of a vision
config, and the text tower (config checked against that embedding, params, tokenizer) of an open_clip /
EVA-CLIP checkpoint or a transformers CLIPModel directory (its config.json gives the TextConfig, its vocab.json +
merges.txt or tokenizer.json the tokenizer). Shared by `dgmr-jax eval` (zero-shot, retrieval) and
`dgmr-jax finetune-text`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from dgmr_jax.core.errors import UserError
from dgmr_jax.io.hf_config import hf_text_config, hf_tokenizer_folder
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


def _hf_spec(checkpoint: Any) -> str | None:
    """The checkpoint as a path string when it is one (a mapping is not a transformers directory)."""
    return os.fspath(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else None


def text_config_for(cfg: ModelConfig, text_arch: str | TextConfig | None = None, checkpoint: Any = None) -> TextConfig:
    """The text tower's config: a transformers CLIPModel checkpoint's config.json (it wins, as for the vision
    tower), else `text_arch` (a preset, a TextConfig .json, a TextConfig), by default the preset named like the
    vision model; its embed_dim must equal the vision tower's image embedding width."""
    spec = _hf_spec(checkpoint)
    arch = (hf_text_config(spec) if spec else None) or text_arch or (cfg.name if cfg.name in TEXT_PRESETS else None)
    if arch is None:
        raise UserError(
            f"model {cfg.name!r} has no text preset of that name: pass --text-arch "
            f"(one of {', '.join(sorted(TEXT_PRESETS))}, or a TextConfig .json)"
        )
    text_cfg = resolve_text_config(arch)
    key, width = clip_embedding(cfg)
    if width != text_cfg.embed_dim:
        raise UserError(
            f"model {cfg.name!r} embeds images in {width} dims ({key}) but text tower {text_cfg.name!r} in "
            f"{text_cfg.embed_dim}: pass the --text-arch and --clip-text of the CLIP model the vision tower came from"
        )
    return text_cfg


def text_tokenizer(text_cfg: TextConfig, checkpoint: Any = None, bpe_vocab: str | None = None) -> Tokenizer:
    """The tokenizer of a text tower: `bpe_vocab` when given, else a transformers directory's own vocabulary
    (vocab.json + merges.txt or tokenizer.json beside its weights), else the CLIP BPE open_clip_torch ships;
    refused when its ids do not fit the tower (vocab_size, the end-of-text id the tower pools at)."""
    spec = _hf_spec(checkpoint)
    tokenizer = Tokenizer(bpe_vocab or (hf_tokenizer_folder(spec) if spec else None))
    size, eos = max(tokenizer.ids.values()) + 1, text_cfg.eos_token
    if size > text_cfg.vocab_size or eos not in (-1, tokenizer.eot):
        pooled = "the largest id" if eos == -1 else eos
        raise UserError(
            f"the tokenizer ({size} ids, end of text {tokenizer.eot}) does not fit text tower {text_cfg.name!r} "
            f"(vocab_size {text_cfg.vocab_size}, pooled at {pooled}): give its vocabulary with "
            "--bpe-vocab (a bpe_simple_vocab_16e6.txt.gz, or a transformers directory with vocab.json + merges.txt)"
        )
    return tokenizer


def open_text_tower(
    checkpoint: str | os.PathLike | Mapping[str, Any],
    cfg: ModelConfig,
    text_arch: str | TextConfig | None = None,
    bpe_vocab: str | None = None,
) -> tuple[TextConfig, Any, Tokenizer]:
    """(TextConfig checked against `cfg`'s image embedding, text params, tokenizer) of a CLIP checkpoint.
    The config and tokenizer are checked before the checkpoint is read."""
    from dgmr_jax.io.text_convert import text_from_torch

    text_cfg = text_config_for(cfg, text_arch, checkpoint)
    tokenizer = text_tokenizer(text_cfg, checkpoint, bpe_vocab)
    text_cfg, text_params = text_from_torch(checkpoint, text_cfg)
    return text_cfg, text_params, tokenizer
