"""CLIP text tower (open_clip's TextTransformer) as a linen module, its frozen TextConfig and named presets; a few
switches make it SigLIP's text tower (transformers' SiglipTextModel) too.

DGMR prunes only the vision tower; this tower is the original, frozen one, needed to turn class names and
captions into embeddings for zero-shot classification and retrieval.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dgmr_jax.core.errors import UserError
from dgmr_jax.models.layers import activation, axes_tree, dense, init_tree, layer_norm, partitioned, shape_tree
from dgmr_jax.models.tree import Params

ACTIVATIONS = ("gelu", "quick_gelu", "gelu_tanh")
POOLS = ("eot", "last")  # eot: at CLIP's end-of-text token (see eos_token); last: the last position (SigLIP)
SCORINGS = ("softmax", "sigmoid")  # CLIP: softmax over exp(logit_scale) * cos; SigLIP: sigmoid(... + logit_bias)


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Architecture of a text tower: pre-norm transformer, pooled token, projection. The defaults are open_clip's
    (causal mask, pooled at the EOT token, bias-free projection, softmax scoring); transformers' CLIP may pool at
    another end-of-text id (eos_token); SigLIP's is bidirectional, pools the last position of its fixed-length
    (padded) input, projects with a bias and scores with a sigmoid."""

    name: str = "text"
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0  # MLP hidden width = int(width * mlp_ratio), as open_clip rounds it
    embed_dim: int = 512  # text_projection output: the joint image-text embedding width
    activation: str = "gelu"  # gelu | quick_gelu (OpenAI-trained weights) | gelu_tanh (SigLIP)
    norm_eps: float = 1e-5
    causal: bool = True  # each token sees only itself and earlier ones (CLIP); False: bidirectional (SigLIP)
    pool: str = "eot"  # one of POOLS
    # with pool "eot", the token whose first position is pooled; -1: the largest id (open_clip, whose EOT is the
    # largest id, and transformers' CLIP configs of eos_token_id 2, which take the argmax of the ids too)
    eos_token: int = -1
    proj_bias: bool = False  # the projection has a bias (SigLIP's head)
    scoring: str = "softmax"  # one of SCORINGS; sigmoid adds a logit_bias param beside logit_scale
    dtype: str = "float32"  # activation / matmul dtype, e.g. bfloat16
    param_dtype: str = "float32"  # of freshly initialized params (converted ones keep the checkpoint's)

    def __post_init__(self) -> None:
        checks = [
            (self.activation in ACTIVATIONS, f"activation must be one of {ACTIVATIONS}, got {self.activation!r}"),
            (self.pool in POOLS, f"pool must be one of {POOLS}, got {self.pool!r}"),
            (self.scoring in SCORINGS, f"scoring must be one of {SCORINGS}, got {self.scoring!r}"),
            (self.width % self.heads == 0, f"width {self.width} is not divisible by heads {self.heads}"),
            (
                min(self.vocab_size, self.context_length, self.layers, self.embed_dim, self.mlp_hidden) > 0,
                "vocab_size, context_length, layers, embed_dim and int(width * mlp_ratio) must be > 0",
            ),
            (-1 <= self.eos_token < self.vocab_size, f"eos_token must be -1 or an id below {self.vocab_size}"),
            (self.pool == "eot" or self.eos_token == -1, f"eos_token is read with pool 'eot' only, not {self.pool!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"TextConfig {self.name!r}: {message}")

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)

    def replace(self, **changes: Any) -> TextConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> TextConfig:
        """A TextConfig from to_json's output; unknown fields are an error, not silently dropped."""
        fields = json.loads(text)
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise UserError(f"unknown TextConfig fields {unknown}")
        return cls(**fields)


# Text towers of the open_clip archs in presets.py (numbers from open_clip's model_configs/<name>.json; a test
# checks them). "-quickgelu" variants are the same towers with OpenAI's activation (OpenAI/MetaCLIP weights).
_BASE = dict(vocab_size=49408, context_length=77, mlp_ratio=4.0)
TEXT_PRESETS: dict[str, dict[str, Any]] = {
    "ViT-B-32": dict(_BASE, width=512, heads=8, layers=12, embed_dim=512),
    "ViT-B-16": dict(_BASE, width=512, heads=8, layers=12, embed_dim=512),
    "ViT-L-14": dict(_BASE, width=768, heads=12, layers=12, embed_dim=768),
    "ViT-g-14": dict(_BASE, width=1024, heads=16, layers=24, embed_dim=1024),
    "ViT-bigG-14": dict(_BASE, width=1280, heads=20, layers=32, embed_dim=1280),
    "EVA02-E-14-plus": dict(_BASE, width=1280, heads=20, layers=32, embed_dim=1024),
}
TEXT_PRESETS.update(
    {
        f"{name}-quickgelu": dict(TEXT_PRESETS[name], activation="quick_gelu")
        for name in ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-bigG-14")
    }
)
# Small towers with no published weights, for a quick try from a random init (the README's text-stage run).
TRY_TEXT_PRESETS: dict[str, dict[str, Any]] = {
    "tiny-384": dict(_BASE, context_length=16, width=128, heads=4, layers=2, embed_dim=384),
}


def resolve_text_config(arch: str | TextConfig) -> TextConfig:
    """The TextConfig for a preset name, a .json file written by TextConfig.to_json, or a TextConfig."""
    if isinstance(arch, TextConfig):
        return arch
    if arch.endswith(".json"):
        return TextConfig.from_json(Path(arch).read_text())
    presets = TEXT_PRESETS | TRY_TEXT_PRESETS
    if arch not in presets:
        known = ", ".join(sorted(presets))
        raise UserError(f"unknown text tower {arch!r}; known: {known}, or a TextConfig .json file")
    return TextConfig(name=arch, **presets[arch])


class TextAttention(nn.Module):
    """Multi-head self-attention; with cfg.causal each token sees only itself and earlier tokens."""

    cfg: TextConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg = self.cfg
        b, n, _ = x.shape
        hd = cfg.width // cfg.heads
        qkv = dense(3 * cfg.width, ("embed", "heads"), cfg, "qkv")(x)
        q, k, v = qkv.reshape(b, n, 3, cfg.heads, hd).transpose(2, 0, 3, 1, 4)
        logits = ((q * (hd**-0.5)) @ k.swapaxes(-1, -2)).astype(jnp.float32)
        if cfg.causal:
            logits = jnp.where(jnp.tril(jnp.ones((n, n), bool)), logits, -jnp.inf)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = (weights @ v).transpose(0, 2, 1, 3).reshape(b, n, cfg.width)
        return dense(cfg.width, ("heads", "embed"), cfg, "proj")(out)


class TextMlp(nn.Module):
    """fc2(act(fc1 x)), open_clip's c_fc / c_proj."""

    cfg: TextConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        h = activation(self.cfg.activation)(dense(self.cfg.mlp_hidden, ("embed", "mlp"), self.cfg, "fc1")(x))
        return dense(self.cfg.width, ("mlp", "embed"), self.cfg, "fc2")(h)


class TextBlock(nn.Module):
    """Pre-norm block: x + attn(norm1 x), then x + mlp(norm2 x)."""

    cfg: TextConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = x + TextAttention(self.cfg, name="attn")(layer_norm(self.cfg, "norm1")(x))
        return x + TextMlp(self.cfg, name="mlp")(layer_norm(self.cfg, "norm2")(x))


class TextTransformer(nn.Module):
    """Token ids (B, n <= context_length) -> text embeddings (B, embed_dim), taken at the EOT token (CLIP) or the
    last position (SigLIP)."""

    cfg: TextConfig

    @nn.compact
    def __call__(self, tokens: jnp.ndarray) -> jnp.ndarray:
        cfg = self.cfg
        b, n = tokens.shape
        normal, dtype = nn.initializers.normal, cfg.param_dtype
        table = self.param(
            "token_embed", partitioned(normal(0.02), ("vocab", "embed")), (cfg.vocab_size, cfg.width), dtype
        )
        pos = self.param(
            "pos_embed", partitioned(normal(0.01), (None, "embed")), (cfg.context_length, cfg.width), dtype
        )
        # the temperature (and SigLIP's bias): not used to embed text, declared so checkpoints convert back complete
        # and image-text logits can be scored; initialized as CLIP (1 / 0.07) and SigLIP (10, -10) initialize them
        sigmoid = cfg.scoring == "sigmoid"
        scale = np.log(10.0) if sigmoid else np.log(1 / 0.07)
        self.param("logit_scale", partitioned(nn.initializers.constant(scale), ()), (), dtype)
        if sigmoid:
            self.param("logit_bias", partitioned(nn.initializers.constant(-10.0), ()), (), dtype)
        x = jnp.take(table, tokens, axis=0).astype(cfg.dtype) + pos[:n].astype(cfg.dtype)
        for i in range(cfg.layers):
            x = TextBlock(cfg, name=f"blocks_{i}")(x)
        x = layer_norm(cfg, "norm")(x)
        if cfg.pool == "last":  # SigLIP: the last position of the padded input, whatever token is there
            pooled = x[:, -1]
        else:  # the EOT token has the largest id in CLIP's vocabulary, so argmax finds it (first one, as torch);
            # with eos_token set, its first position (transformers' CLIP rule for eos_token_id != 2)
            eot = jnp.argmax(tokens if cfg.eos_token < 0 else tokens == cfg.eos_token, axis=-1)
            pooled = x[jnp.arange(b), eot]
        return dense(cfg.embed_dim, ("embed", "classes"), cfg, "proj", bias=cfg.proj_bias)(pooled)


def encode_text(cfg: TextConfig, params: Params, tokens: jnp.ndarray) -> jnp.ndarray:
    """Unnormalized text embeddings (B, embed_dim) of token ids (B, n): open_clip's model.encode_text(tokens)."""
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] > cfg.context_length:
        raise UserError(f"tokens must be (batch, n <= {cfg.context_length}) ids, got shape {tokens.shape}")
    return TextTransformer(cfg).apply({"params": params}, tokens)


def _init(cfg: TextConfig, rng: jax.Array) -> Params:
    return TextTransformer(cfg).init(rng, jnp.zeros((1, cfg.context_length), jnp.int32))["params"]


def init_text_params(cfg: TextConfig, rng: jax.Array | int = 0) -> Params:
    """Randomly initialized text-tower params (plain arrays), for tests and shapes."""
    return init_tree(_init, cfg, rng)


def text_param_shapes(cfg: TextConfig) -> Params:
    """Text-tower param tree of jax.ShapeDtypeStruct, built without allocating."""
    return shape_tree(functools.partial(_init, cfg))


def text_logical_axes(cfg: TextConfig) -> Params:
    """Text-tower param tree of logical axis-name PartitionSpecs (see dgmr_jax.core.parallel.RULES)."""
    return axes_tree(functools.partial(_init, cfg))
