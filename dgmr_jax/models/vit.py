"""One configurable linen ViT encoder covering timm ViT/DeiT, DINOv2, EVA/EVA02, EVA-CLIP-8B/18B, OpenCLIP and
InternViT towers."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dgmr_jax.core.errors import UserError
from dgmr_jax.core.parallel import BATCH
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
    softmax attention itself by cfg.attention (einsum, or jax.nn.dot_product_attention).

    `heads` heads whose queries and keys have attn_head_dim each and whose values have `vdims` widths (a UVC slim
    layer); the qkv columns are q of every head, k of every head, then each head's values at its own width.
    """

    cfg: ModelConfig
    heads: int
    vdims: tuple[int, ...]

    @nn.compact
    def __call__(self, x: jnp.ndarray, rope: tuple[jnp.ndarray, jnp.ndarray] | None) -> jnp.ndarray:
        cfg, heads, hd = self.cfg, self.heads, self.cfg.attn_head_dim
        b, n, _ = x.shape
        qk, values = heads * hd, sum(self.vdims)
        qkv = dense(2 * qk + values, ("embed", "heads"), cfg, "qkv", bias=cfg.qkv_bias == "full")(x)
        if cfg.qkv_bias == "qv":
            zeros = nn.initializers.zeros
            q_bias = self.param("q_bias", partitioned(zeros, ("heads",)), (qk,), cfg.param_dtype)
            v_bias = self.param("v_bias", partitioned(zeros, ("heads",)), (values,), cfg.param_dtype)
            qkv = qkv + jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias]).astype(qkv.dtype)
        if cfg.qk_norm == "full":  # InternViT: q and k normalized over all heads at once, before the split
            q, k, v = qkv[..., :qk], qkv[..., qk : 2 * qk], qkv[..., 2 * qk :]
            q, k = rms_norm(cfg, "q_norm", axis="heads")(q), rms_norm(cfg, "k_norm", axis="heads")(k)
            qkv = jnp.concatenate([q, k, v], axis=-1)
        if set(self.vdims) == {hd}:  # every value at full width: one (B, N, 3, heads, hd) tensor
            qkv = qkv.reshape(b, n, 3, heads, hd)
            if cfg.attention == "einsum":
                out = _einsum_attention(qkv, rope)
            else:
                out = _fused_attention(qkv, rope, cfg.attention)
            out = out.reshape(b, n, values)
        elif cfg.attention == "einsum":
            out = _narrow_einsum_attention(qkv, rope, heads, hd, self.vdims)
        else:
            out = _padded_fused_attention(qkv, rope, heads, hd, self.vdims, cfg.attention)
        if cfg.attn_norm:
            out = norm(cfg, "norm", axis="heads")(out)
        return dense(cfg.width, ("heads", "embed"), cfg, "proj")(out)


def _value_columns(hd: int, vdims: tuple[int, ...]) -> np.ndarray:
    """Positions of the valid value columns inside values padded to hd per head: head h, dim j -> h * hd + j."""
    return np.concatenate([h * hd + np.arange(w) for h, w in enumerate(vdims)]).astype(np.int32)


def _narrow_einsum_attention(
    qkv: jnp.ndarray, rope: tuple[jnp.ndarray, jnp.ndarray] | None, heads: int, hd: int, vdims: tuple[int, ...]
) -> jnp.ndarray:
    """Einsum attention of a layer whose values are narrower than hd: the attention weights of all heads in one
    batched matmul, then one batched matmul per distinct value width over the heads of that width, so the
    weights-times-values matmuls cost exactly n * n * sum(vdims) multiply-accumulates. Returns (B, N, sum(vdims))."""
    b, n, _ = qkv.shape
    qk = heads * hd
    q = qkv[..., :qk].reshape(b, n, heads, hd).transpose(0, 2, 1, 3)
    k = qkv[..., qk : 2 * qk].reshape(b, n, heads, hd).transpose(0, 2, 1, 3)
    v = qkv[..., 2 * qk :]
    weights = _attention_weights(q, k, rope, hd).astype(v.dtype)
    starts = np.cumsum((0,) + vdims)
    parts, order = [], []
    for width in sorted(set(vdims)):
        group = [h for h, w in enumerate(vdims) if w == width]
        cols = np.concatenate([starts[h] + np.arange(width) for h in group])
        contiguous = group == list(range(group[0], group[-1] + 1))
        vg = v[..., starts[group[0]] : starts[group[-1] + 1]] if contiguous else v[..., cols]
        vg = vg.reshape(b, n, len(group), width).transpose(0, 2, 1, 3)
        wg = weights[:, group[0] : group[-1] + 1] if contiguous else weights[:, np.asarray(group)]
        parts.append((wg @ vg).transpose(0, 2, 1, 3).reshape(b, n, len(group) * width))
        order.append(cols)
    out = jnp.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
    order = np.concatenate(order)
    return out if np.array_equal(order, np.arange(len(order))) else out[..., np.argsort(order)]


def _padded_fused_attention(
    qkv: jnp.ndarray,
    rope: tuple[jnp.ndarray, jnp.ndarray] | None,
    heads: int,
    hd: int,
    vdims: tuple[int, ...],
    kind: str,
) -> jnp.ndarray:
    """Fused attention of a layer whose values are narrower than hd: jax.nn.dot_product_attention needs values
    as wide as keys, so each head's values are padded to hd with exact zeros and the valid columns taken after
    (the padded columns cost n * n multiply-accumulates each that count_flops does not count)."""
    b, n, _ = qkv.shape
    qk = heads * hd
    v = qkv[..., 2 * qk :]
    # gather from [v, 0]: index sum(vdims) is the zero column
    source = np.full(heads * hd, sum(vdims), np.int32)
    source[_value_columns(hd, vdims)] = np.arange(sum(vdims))
    padded = jnp.concatenate([v, jnp.zeros_like(v[..., :1])], axis=-1)[..., source]
    full = jnp.concatenate([qkv[..., : 2 * qk], padded], axis=-1).reshape(b, n, 3, heads, hd)
    out = _fused_attention(full, rope, kind).reshape(b, n, heads * hd)
    return out[..., _value_columns(hd, vdims)]


def _einsum_attention(qkv: jnp.ndarray, rope: tuple[jnp.ndarray, jnp.ndarray] | None) -> jnp.ndarray:
    """Softmax attention of qkv (B, N, 3, heads, hd) -> (B, N, heads, hd) as batched matmuls in (B, heads, N, hd),
    the softmax in float32."""
    # (3, B, heads, N, hd): batched matmuls in this layout are ~3x faster on XLA:CPU than einsums over (B, N, h, d)
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)
    weights = _attention_weights(q, k, rope, qkv.shape[-1]).astype(v.dtype)
    return (weights @ v).transpose(0, 2, 1, 3)


def _attention_weights(
    q: jnp.ndarray, k: jnp.ndarray, rope: tuple[jnp.ndarray, jnp.ndarray] | None, hd: int
) -> jnp.ndarray:
    """Softmax attention weights (B, heads, N, N) of q, k (B, heads, N, hd) in float32 (float64 for float64 models),
    RoPE on the patch tokens."""
    n = q.shape[2]
    if rope is not None:
        npt = n - rope[0].shape[0]
        q = jnp.concatenate([q[:, :, :npt], apply_rope(q[:, :, npt:], *rope)], axis=2)
        k = jnp.concatenate([k[:, :, :npt], apply_rope(k[:, :, npt:], *rope)], axis=2)
    logits = (q * (hd**-0.5)) @ k.swapaxes(-1, -2)
    return jax.nn.softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)


def _fused_attention(qkv: jnp.ndarray, rope: tuple[jnp.ndarray, jnp.ndarray] | None, kind: str) -> jnp.ndarray:
    """The same attention through jax.nn.dot_product_attention, in its (B, N, heads, hd) layout: JAX's default
    implementation ("dot_product_attention": XLA, logits and softmax in float32) or cuDNN flash attention
    ("cudnn": NVIDIA GPUs, bfloat16/float16, head_dim a multiple of 8)."""
    n, hd = qkv.shape[1], qkv.shape[-1]
    if kind == "cudnn" and qkv.dtype not in (jnp.bfloat16, jnp.float16):
        raise UserError(
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


class AttentionPool(nn.Module):
    """SigLIP's multi-head attention pooling (timm AttentionPoolLatent, transformers
    SiglipMultiheadAttentionPoolingHead): a learned probe token queries the tokens (q from the probe, k and v from
    the tokens, num_heads heads of width // num_heads), proj, then a LayerNorm + MLP residual; (B, N, D) -> (B, D).
    Its MLP is part of the head: pruning leaves it whole and Taylor scoring does not see it."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg = self.cfg
        (b, n, d), heads = x.shape, cfg.num_heads
        latent = self.param("latent", partitioned(kernel_init, (None, None, "embed")), (1, 1, d), cfg.param_dtype)
        q = dense(d, ("embed", "heads"), cfg, "q")(latent.astype(cfg.dtype)).reshape(1, heads, 1, d // heads)
        kv = dense(2 * d, ("embed", "heads"), cfg, "kv")(x).reshape(b, n, 2, heads, d // heads)
        k, v = kv.transpose(2, 0, 3, 1, 4)
        weights = _attention_weights(jnp.broadcast_to(q, (b, heads, 1, d // heads)), k, None, d // heads)
        pooled = dense(d, ("heads", "embed"), cfg, "proj")((weights.astype(v.dtype) @ v).reshape(b, d))
        h = activation(cfg.mlp_type)(dense(cfg.pool_hidden, ("embed", "mlp"), cfg, "fc1")(norm(cfg, "norm")(pooled)))
        return pooled + dense(d, ("mlp", "embed"), cfg, "fc2")(h)


class LayerScale(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        init = partitioned(nn.initializers.ones, ("embed",))
        return x * self.param("scale", init, (self.cfg.width,), self.cfg.param_dtype).astype(x.dtype)


class Block(nn.Module):
    """Pre-norm (x + f(norm x)) or post-norm (x + norm(f x)) transformer block; a branch with no heads (attention)
    or no hidden neurons (MLP) is absent: no params, it adds nothing."""

    cfg: ModelConfig
    hidden: int
    heads: int
    vdims: tuple[int, ...]

    @nn.compact
    def __call__(self, x: jnp.ndarray, rope: tuple[jnp.ndarray, jnp.ndarray] | None) -> jnp.ndarray:
        cfg = self.cfg
        if self.heads:
            norm1, attn = norm(cfg, "norm1"), Attention(cfg, self.heads, self.vdims, name="attn")
            ls1 = LayerScale(cfg, name="ls1") if cfg.layer_scale else (lambda y: y)
            x = x + (ls1(norm1(attn(x, rope))) if cfg.post_norm else ls1(attn(norm1(x), rope)))
        if self.hidden:
            norm2, mlp = norm(cfg, "norm2"), Mlp(cfg, self.hidden, name="mlp")
            ls2 = LayerScale(cfg, name="ls2") if cfg.layer_scale else (lambda y: y)
            x = x + (ls2(norm2(mlp(x))) if cfg.post_norm else ls2(mlp(norm2(x))))
        return x


def _gated(x: jnp.ndarray, out: jnp.ndarray, gate: jnp.ndarray | None) -> jnp.ndarray:
    """UVC's block gate: x + gate * (Block(x) - x); no op without a gate."""
    return out if gate is None else x + gate.astype(x.dtype) * (out - x)


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


def _batch_sharded(x: jnp.ndarray) -> jnp.ndarray:
    """x with its batch dim split over the data-parallel mesh axes of the mesh it is traced under (none: as is).
    Without it the compiler may lay a scanned stack's carry out like the params, width over fsdp, and then every
    fsdp chip computes the attention of all the images of its data shard (EVA-E on v5e-32: 8x)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH) <= set(mesh.axis_names):
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(BATCH))


class _ScanStep(nn.Module):
    """Block in the (carry, output) form nn.scan expects; with a gate, the gated block."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, rope, gate=None):
        cfg = self.cfg
        x = _batch_sharded(x)
        out = _block_type(cfg, scanned=True)(cfg, cfg.mlp_hidden[0], cfg.heads(0), cfg.vdims(0), name="block")(x, rope)
        return _gated(x, out, gate), None


class VisionTransformer(nn.Module):
    """ViT vision tower. Input (B, H, W, 3) normalized images; output dict of tokens/pooled/logits."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, images: jnp.ndarray, gates: jnp.ndarray | None = None) -> dict[str, jnp.ndarray]:
        cfg = self.cfg
        _, h, w, _ = images.shape
        p = cfg.patch_size
        if h % p or w % p:
            raise UserError(f"image size {h}x{w} is not a multiple of the patch size {p}")
        gh, gw = h // p, w // p
        x = PatchEmbed(cfg, name="patch_embed")(images.astype(cfg.dtype))
        x = self._embed(x, gh, gw)
        if cfg.pre_norm:
            x = norm(cfg, "norm_pre")(x)
        x = self._blocks(x, _rope(cfg, gh, gw), gates)
        if cfg.final_norm:
            x = norm(cfg, "norm")(x)
        return {"tokens": x, **self._heads(x)}

    def _embed(self, x: jnp.ndarray, gh: int, gw: int) -> jnp.ndarray:
        """Patch tokens plus their (resampled) positions, after the prefix tokens (class, distillation,
        registers) plus theirs. Params are created in the order checkpoints expect (their init keys follow it)."""
        cfg = self.cfg
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
        pos_patch = resample_grid(
            pos_patch.reshape(cfg.grid, cfg.grid, -1), (gh, gw), cfg.pos_resample_antialias, cfg.pos_resample_offset
        )
        x = x + pos_patch.reshape(1, gh * gw, -1).astype(x.dtype)
        prefix = prefix.at[:, : cfg.pos_embed_prefix].add(pos_prefix.astype(x.dtype))
        return jnp.concatenate([jnp.broadcast_to(prefix, (x.shape[0], *prefix.shape[1:])), x], axis=1)

    def _blocks(
        self, x: jnp.ndarray, rope: tuple[jnp.ndarray, jnp.ndarray] | None, gates: jnp.ndarray | None
    ) -> jnp.ndarray:
        """The transformer blocks (scanned or one module each), each optionally gated (UVC block skipping)."""
        cfg = self.cfg
        if gates is not None:
            gates = jnp.asarray(gates)
            if gates.shape != (cfg.depth,):
                raise UserError(f"gates must have shape (depth,) = ({cfg.depth},), got {gates.shape}")
        if cfg.scan_layers:
            stack = nn.scan(
                _ScanStep,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=nn.broadcast if gates is None else (nn.broadcast, 0),
                length=cfg.depth,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = stack(cfg, name="blocks")(x, rope, *(() if gates is None else (gates,)))
            return x
        block = _block_type(cfg, scanned=False)
        for i, hidden in enumerate(cfg.mlp_hidden):
            x = _batch_sharded(x)
            out = block(cfg, hidden, cfg.heads(i), cfg.vdims(i), name=f"blocks_{i}")(x, rope)
            x = _gated(x, out, None if gates is None else gates[i])
        return x

    def _heads(self, x: jnp.ndarray) -> dict[str, jnp.ndarray]:
        """Pooled vector (class token, distillation average, patch mean or attention pool; fc_norm, proj) and logits
        if any."""
        cfg = self.cfg
        out = {}
        if cfg.dist_token:
            pooled, pooled_dist = x[:, 0], x[:, 1]
        elif cfg.global_pool == "token":
            pooled = x[:, 0]
        elif cfg.global_pool == "map":
            pooled = AttentionPool(cfg, name="attn_pool")(x[:, cfg.num_prefix_tokens :])
        else:
            pooled = x[:, cfg.num_prefix_tokens :].mean(axis=1)
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


def _rope(cfg: ModelConfig, gh: int, gw: int) -> tuple[jnp.ndarray, jnp.ndarray] | None:
    """The rotary tables (sin, cos) of a gh x gw patch grid, or None without rope."""
    if not cfg.rope:
        return None
    ref = cfg.rope_ref_grid or cfg.grid
    sin, cos = rope_tables(cfg.attn_head_dim, (gh, gw), (ref, ref), cfg.rope_temperature)
    return (jnp.asarray(sin), jnp.asarray(cos))


def forward(
    cfg: ModelConfig, params: Params, images: jnp.ndarray, gates: jnp.ndarray | None = None
) -> dict[str, jnp.ndarray]:
    """Run the vision tower: images (B, H, W, 3), normalized -> {"tokens", "pooled"[, "logits"]}.

    gates: optional (depth,) block gates pi (UVC's skip gate): block i computes x + pi_i * (Block_i(x) - x), so
    pi_i = 0 skips it and pi_i = 1 runs it; None runs every block as is, with no extra op.
    """
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise UserError(f"images must be (batch, height, width, 3) channels-last, got shape {images.shape}")
    return VisionTransformer(cfg).apply({"params": params}, images, gates)


def _init(cfg: ModelConfig, rng: jax.Array) -> Params:
    images = jnp.zeros((1, cfg.img_size, cfg.img_size, 3), jnp.float32)
    return VisionTransformer(cfg).init(rng, images)["params"]


def init_params(cfg: ModelConfig, rng: jax.Array | int = 0) -> Params:
    """Randomly initialized params (plain arrays) for cfg."""
    return init_tree(_init, cfg, rng)


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
        jnp.asarray(params["pos_embed"]),
        cfg.pos_embed_prefix,
        (new_cfg.grid, new_cfg.grid),
        cfg.pos_resample_antialias,
        cfg.pos_resample_offset,
    )
    return new_cfg, {**params, "pos_embed": np.asarray(pos)}


def count_tree(params: Params) -> int:
    """Number of scalars in a param (or shape) tree."""
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params)))
