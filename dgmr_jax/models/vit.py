"""One configurable linen ViT encoder covering timm ViT/DeiT, DINOv2, EVA/EVA02, EVA-CLIP-8B/18B, OpenCLIP and
InternViT towers."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dgmr_jax.models.config import ModelConfig
from dgmr_jax.models.layers import (
    activation,
    axes_tree,
    dense,
    init_tree,
    kernel_init,
    layer_norm,
    partitioned,
    rms_norm,
    shape_tree,
)
from dgmr_jax.models.posemb import apply_rope, resample_grid, resample_pos_embed, rope_tables
from dgmr_jax.models.tree import Params


def norm(cfg: ModelConfig, name: str, axis: str = "embed") -> nn.Module:
    """The tower's norm layer of kind cfg.norm (LayerNorm or RMSNorm), its params named by `axis`."""
    return (rms_norm if cfg.norm == "rmsnorm" else layer_norm)(cfg, name, axis)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> width, as one matmul (a strided conv is several times slower on
    XLA:CPU, backward most of all); the kernel keeps the conv layout (p, p, 3, width)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
        cfg, p = self.cfg, self.cfg.patch_size
        b, h, w, c = images.shape
        kernel = self.param(
            "kernel", partitioned(kernel_init, (None, None, None, "embed")), (p, p, c, cfg.width), cfg.param_dtype
        )
        patches = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        x = patches.reshape(b, (h // p) * (w // p), p * p * c) @ kernel.reshape(p * p * c, -1).astype(cfg.dtype)
        if cfg.patch_bias:
            bias = self.param("bias", partitioned(nn.initializers.zeros, ("embed",)), (cfg.width,), cfg.param_dtype)
            x = x + bias.astype(cfg.dtype)
        return x


class Attention(nn.Module):
    """Multi-head self-attention with fused qkv, optional q/v-only bias, q/k norm, RoPE and output norm; the
    softmax attention itself by cfg.attention (einsum, or jax.nn.dot_product_attention)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray, rope: tuple[jnp.ndarray, jnp.ndarray] | None) -> jnp.ndarray:
        cfg = self.cfg
        b, n, _ = x.shape
        heads, hd = cfg.num_heads, cfg.attn_head_dim
        qkv = dense(3 * cfg.attn_dim, ("embed", "heads"), cfg, "qkv", bias=cfg.qkv_bias == "full")(x)
        if cfg.qkv_bias == "qv":
            zeros = nn.initializers.zeros
            q_bias = self.param("q_bias", partitioned(zeros, ("heads",)), (cfg.attn_dim,), cfg.param_dtype)
            v_bias = self.param("v_bias", partitioned(zeros, ("heads",)), (cfg.attn_dim,), cfg.param_dtype)
            qkv = qkv + jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias]).astype(qkv.dtype)
        if cfg.qk_norm == "full":  # InternViT: q and k normalized over all heads at once, before the split
            q, k, v = jnp.split(qkv, 3, axis=-1)
            q, k = rms_norm(cfg, "q_norm", axis="heads")(q), rms_norm(cfg, "k_norm", axis="heads")(k)
            qkv = jnp.concatenate([q, k, v], axis=-1)
        qkv = qkv.reshape(b, n, 3, heads, hd)
        out = _einsum_attention(qkv, rope) if cfg.attention == "einsum" else _fused_attention(qkv, rope, cfg.attention)
        out = out.reshape(b, n, cfg.attn_dim)
        if cfg.attn_norm:
            out = norm(cfg, "norm", axis="heads")(out)
        return dense(cfg.width, ("heads", "embed"), cfg, "proj")(out)


def _einsum_attention(qkv: jnp.ndarray, rope: tuple[jnp.ndarray, jnp.ndarray] | None) -> jnp.ndarray:
    """Softmax attention of qkv (B, N, 3, heads, hd) -> (B, N, heads, hd) as batched matmuls in (B, heads, N, hd),
    the softmax in float32."""
    n, hd = qkv.shape[1], qkv.shape[-1]
    # (3, B, heads, N, hd): batched matmuls in this layout are ~3x faster on XLA:CPU than einsums over (B, N, h, d)
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)
    if rope is not None:
        npt = n - rope[0].shape[0]
        q = jnp.concatenate([q[:, :, :npt], apply_rope(q[:, :, npt:], *rope)], axis=2)
        k = jnp.concatenate([k[:, :, :npt], apply_rope(k[:, :, npt:], *rope)], axis=2)
    logits = (q * (hd**-0.5)) @ k.swapaxes(-1, -2)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return (weights @ v).transpose(0, 2, 1, 3)


def _fused_attention(qkv: jnp.ndarray, rope: tuple[jnp.ndarray, jnp.ndarray] | None, kind: str) -> jnp.ndarray:
    """The same attention through jax.nn.dot_product_attention, in its (B, N, heads, hd) layout: JAX's default
    implementation ("dot_product_attention": XLA, logits and softmax in float32) or cuDNN flash attention
    ("cudnn": NVIDIA GPUs, bfloat16/float16, head_dim a multiple of 8)."""
    n, hd = qkv.shape[1], qkv.shape[-1]
    if kind == "cudnn" and qkv.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(
            f"attention='cudnn' (cuDNN flash attention) needs dtype bfloat16 or float16, got {qkv.dtype}; "
            "use attention='dot_product_attention' or 'einsum' for float32"
        )
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if rope is not None:
        npt = n - rope[0].shape[0]
        sin, cos = rope[0][:, None], rope[1][:, None]  # (patches, 1, hd): broadcast over heads
        q = jnp.concatenate([q[:, :npt], apply_rope(q[:, npt:], sin, cos)], axis=1)
        k = jnp.concatenate([k[:, :npt], apply_rope(k[:, npt:], sin, cos)], axis=1)
    impl = "cudnn" if kind == "cudnn" else None
    return jax.nn.dot_product_attention(q, k, v, scale=hd**-0.5, implementation=impl)


class Mlp(nn.Module):
    """fc2(act(fc1 x)) or, gated, fc2(norm(silu(fc1_g x) * fc1_x x)); hidden width per layer."""

    cfg: ModelConfig
    hidden: int

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg = self.cfg
        if cfg.gated:
            gate = dense(self.hidden, ("embed", "mlp"), cfg, "fc1_g")(x)
            h = jax.nn.silu(gate) * dense(self.hidden, ("embed", "mlp"), cfg, "fc1_x")(x)
        else:
            h = activation(cfg.mlp_type)(dense(self.hidden, ("embed", "mlp"), cfg, "fc1")(x))
        if cfg.mlp_norm:
            h = norm(cfg, "norm", axis="mlp")(h)
        # the fc2 input, exposed for Taylor importance (both are no-ops unless the collections are asked for)
        self.sow("intermediates", "hidden", h)
        h = self.perturb("hidden", h)
        return dense(cfg.width, ("mlp", "embed"), cfg, "fc2")(h)


class LayerScale(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        init = partitioned(nn.initializers.ones, ("embed",))
        return x * self.param("scale", init, (self.cfg.width,), self.cfg.param_dtype).astype(x.dtype)


class Block(nn.Module):
    """Pre-norm (x + f(norm x)) or post-norm (x + norm(f x)) transformer block."""

    cfg: ModelConfig
    hidden: int

    @nn.compact
    def __call__(self, x: jnp.ndarray, rope: tuple[jnp.ndarray, jnp.ndarray] | None) -> jnp.ndarray:
        cfg = self.cfg
        norm1, norm2 = norm(cfg, "norm1"), norm(cfg, "norm2")
        attn, mlp = Attention(cfg, name="attn"), Mlp(cfg, self.hidden, name="mlp")
        ls1 = LayerScale(cfg, name="ls1") if cfg.layer_scale else (lambda y: y)
        ls2 = LayerScale(cfg, name="ls2") if cfg.layer_scale else (lambda y: y)
        if cfg.post_norm:
            x = x + ls1(norm1(attn(x, rope)))
            return x + ls2(norm2(mlp(x)))
        x = x + ls1(attn(norm1(x), rope))
        return x + ls2(mlp(norm2(x)))


def _block_type(cfg: ModelConfig, scanned: bool) -> type[nn.Module]:
    """Block, or with cfg.remat a rematerialized Block whose backward keeps only the block's input.

    The policy saves nothing inside a block (`nothing_saveable`), so the student's backward holds one
    (batch, tokens, width) residual per layer plus one block's activations at a time: measured with the TPU
    compiler (ViT-B, 32 images/chip at 224 px, bf16) 11-12 MiB per layer against 9.2 MiB predicted, instead
    of ~190 MiB without remat. Unscanned blocks keep remat's CSE barrier (else XLA merges the recompute back
    into the forward); inside nn.scan the loop itself separates them.
    """
    if not cfg.remat:
        return Block
    return nn.remat(Block, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=not scanned)


class _ScanStep(nn.Module):
    """Block in the (carry, output) form nn.scan expects."""

    cfg: ModelConfig
    hidden: int

    @nn.compact
    def __call__(self, x, rope):
        return _block_type(self.cfg, scanned=True)(self.cfg, self.hidden, name="block")(x, rope), None


class VisionTransformer(nn.Module):
    """ViT vision tower. Input (B, H, W, 3) normalized images; output dict of tokens/pooled/logits."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, images: jnp.ndarray) -> dict[str, jnp.ndarray]:
        cfg = self.cfg
        b, h, w, _ = images.shape
        p = cfg.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
        gh, gw = h // p, w // p
        x = PatchEmbed(cfg, name="patch_embed")(images.astype(cfg.dtype))

        token_init = partitioned(kernel_init, (None, None, "embed"))
        prefix = [
            self.param(name, token_init, (1, count, cfg.width), cfg.param_dtype)
            for name, count in (
                ("cls_token", int(cfg.class_token)),
                ("dist_token", int(cfg.dist_token)),
                ("reg_token", cfg.reg_tokens),
            )
            if count
        ]
        if cfg.mask_token:  # declared so DINOv2 checkpoints round-trip; only masked training reads it
            self.param(
                "mask_token", partitioned(nn.initializers.zeros, (None, "embed")), (1, cfg.width), cfg.param_dtype
            )
        prefix = jnp.concatenate(prefix, axis=1).astype(x.dtype) if prefix else x[:, :0]
        pos = self.param(
            "pos_embed", token_init, (1, cfg.pos_embed_prefix + cfg.grid * cfg.grid, cfg.width), cfg.param_dtype
        )
        pos_prefix, pos_patch = pos[:, : cfg.pos_embed_prefix], pos[0, cfg.pos_embed_prefix :]
        pos_patch = resample_grid(pos_patch.reshape(cfg.grid, cfg.grid, -1), (gh, gw), cfg.pos_resample_antialias)
        x = x + pos_patch.reshape(1, gh * gw, -1).astype(x.dtype)
        prefix = prefix.at[:, : cfg.pos_embed_prefix].add(pos_prefix.astype(x.dtype))
        x = jnp.concatenate([jnp.broadcast_to(prefix, (b, *prefix.shape[1:])), x], axis=1)
        if cfg.pre_norm:
            x = norm(cfg, "norm_pre")(x)

        rope = None
        if cfg.rope:
            ref = cfg.rope_ref_grid or cfg.grid
            sin, cos = rope_tables(cfg.attn_head_dim, (gh, gw), (ref, ref), cfg.rope_temperature)
            rope = (jnp.asarray(sin), jnp.asarray(cos))

        if cfg.scan_layers:
            stack = nn.scan(
                _ScanStep,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=nn.broadcast,
                length=cfg.depth,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = stack(cfg, cfg.mlp_hidden[0], name="blocks")(x, rope)
        else:
            block = _block_type(cfg, scanned=False)
            for i, hidden in enumerate(cfg.mlp_hidden):
                x = block(cfg, hidden, name=f"blocks_{i}")(x, rope)

        if cfg.final_norm:
            x = norm(cfg, "norm")(x)
        out = {"tokens": x}
        npt = cfg.num_prefix_tokens
        if cfg.dist_token:
            pooled, pooled_dist = x[:, 0], x[:, 1]
        elif cfg.global_pool == "token":
            pooled = x[:, 0]
        else:
            pooled = x[:, npt:].mean(axis=1)
        if cfg.fc_norm:
            pooled = norm(cfg, "fc_norm")(pooled)
        if cfg.num_classes:
            logits = dense(cfg.num_classes, ("embed", "classes"), cfg, "head", bias=cfg.head_bias)(pooled)
            if cfg.dist_token:
                head_dist = dense(cfg.num_classes, ("embed", "classes"), cfg, "head_dist", bias=cfg.head_bias)
                logits_dist = head_dist(pooled_dist)
                logits = (logits + logits_dist) / 2
            out["logits"] = logits
        if cfg.dist_token:
            pooled = (pooled + pooled_dist) / 2
        if cfg.proj_dim:
            pooled = dense(cfg.proj_dim, ("embed", "classes"), cfg, "proj", bias=False)(pooled)
        out["pooled"] = pooled
        return out


def forward(cfg: ModelConfig, params: Params, images: jnp.ndarray) -> dict[str, jnp.ndarray]:
    """Run the vision tower: images (B, H, W, 3), normalized -> {"tokens", "pooled"[, "logits"]}."""
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (batch, height, width, 3) channels-last, got shape {images.shape}")
    return VisionTransformer(cfg).apply({"params": params}, images)


def _init(cfg: ModelConfig, rng: jax.Array) -> Params:
    images = jnp.zeros((1, cfg.img_size, cfg.img_size, 3), jnp.float32)
    return VisionTransformer(cfg).init(rng, images)["params"]


def init_params(cfg: ModelConfig, rng: jax.Array | int = 0) -> Params:
    """Randomly initialized params (plain arrays) for cfg."""
    return init_tree(functools.partial(_init, cfg), rng)


def param_shapes(cfg: ModelConfig) -> Params:
    """Param tree of jax.ShapeDtypeStruct, built without allocating (jax.eval_shape)."""
    return shape_tree(functools.partial(_init, cfg))


def logical_axes(cfg: ModelConfig) -> Params:
    """Param tree of logical axis-name PartitionSpecs, mapped to mesh axes by sharding rules."""
    return axes_tree(functools.partial(_init, cfg))


def set_image_size(cfg: ModelConfig, params: Params, img_size: int) -> tuple[ModelConfig, Params]:
    """Resample the learned position grid for another input resolution (timm's load-time resize)."""
    new_cfg = cfg.replace(img_size=img_size)
    if new_cfg.grid == cfg.grid:
        return new_cfg, params
    pos = resample_pos_embed(
        jnp.asarray(params["pos_embed"]), cfg.pos_embed_prefix, (new_cfg.grid, new_cfg.grid), cfg.pos_resample_antialias
    )
    return new_cfg, {**params, "pos_embed": np.asarray(pos)}


def count_tree(params: Params) -> int:
    """Number of scalars in a param (or shape) tree."""
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params)))
