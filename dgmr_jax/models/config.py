"""ModelConfig: the frozen description of one ViT encoder, shared by every stage."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from dgmr_jax.core.errors import UserError

MLP_TYPES = ("gelu", "gelu_tanh", "quick_gelu", "swiglu")
QKV_BIAS = ("full", "qv", "none")
# token: the class token; avg: mean of the patch tokens; map: SigLIP's attention pool (a learned probe attends
# over the patch tokens, then LayerNorm + MLP residual)
POOLS = ("token", "avg", "map")
NORMS = ("layernorm", "rmsnorm")
# "": none; "full": RMSNorm of q and of k over the whole attention width before the split into heads (InternViT-6B)
QK_NORMS = ("", "full")
# einsum: batched matmuls in (B, heads, N, d), softmax in float32 (the reference path);
# dot_product_attention: jax.nn.dot_product_attention with JAX's default implementation (XLA today);
# cudnn: jax.nn.dot_product_attention(implementation="cudnn"), cuDNN flash attention (NVIDIA GPU, bf16/fp16)
ATTENTION = ("einsum", "dot_product_attention", "cudnn")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a ViT vision tower; every family of docs/method.md is a setting of it.

    Fields marked "layout" change only how a PyTorch checkpoint names or packs its tensors,
    not what the Flax model computes.
    """

    name: str = "vit"
    img_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    head_dim: int = 0  # 0: width // num_heads
    mlp_hidden: tuple[int, ...] = ()  # per-layer hidden width (fc2 input); () means 4 * width; 0: no MLP branch
    # UVC slim models (see docs/method.md): per-layer head count, () meaning num_heads everywhere and 0 a layer
    # without attention branch; per layer, each head's value width (1..attn_head_dim), () meaning attn_head_dim
    # for every head. Queries and keys always keep attn_head_dim per head.
    layer_heads: tuple[int, ...] = ()
    value_dims: tuple[tuple[int, ...], ...] = ()
    mlp_type: str = "gelu"  # gelu (erf) | gelu_tanh (tanh form: SigLIP) | quick_gelu | swiglu (silu(gate) * value)
    mlp_norm: bool = False  # LayerNorm over the hidden width before fc2 (EVA02 "ffn_ln")
    qkv_bias: str = "full"  # full | qv (EVA: no k bias) | none
    attn_norm: bool = False  # LayerNorm on the attention output before proj (EVA-CLIP "subln")
    layer_scale: bool = False  # per-channel scales on both residual branches (DINOv2, EVA)
    post_norm: bool = False  # x + norm(f(x)) blocks (EVA02-CLIP-E-plus, EVA-CLIP-18B)
    norm: str = "layernorm"  # every norm of the tower: layernorm | rmsnorm (scale only: EVA-CLIP-8B/18B, InternViT-6B)
    qk_norm: str = ""  # see QK_NORMS; always RMSNorm, whatever `norm` is
    norm_eps: float = 1e-6
    patch_bias: bool = True
    class_token: bool = True
    dist_token: bool = False  # DeiT distilled: second prefix token and head_dist
    reg_tokens: int = 0
    pos_embed_prefix: int = 1  # leading prefix tokens that have a position embedding (0, 1 or all)
    pre_norm: bool = False  # LayerNorm after the embeddings (OpenCLIP ln_pre)
    final_norm: bool = True  # LayerNorm on all tokens after the last block
    fc_norm: bool = False  # LayerNorm on the pooled vector (timm avg pooling)
    global_pool: str = "token"  # token | avg (mean of patch tokens) | map (attention pool over the patch tokens)
    pool_hidden: int = 0  # MLP width of the map head (never pruned); 0 with global_pool="map": mlp_hidden[0]
    num_classes: int = 0  # classification / embedding head -> "logits"
    head_bias: bool = True  # the head has a bias (EVA-CLIP-8B/18B's has none)
    proj_dim: int = 0  # bias-free projection of the pooled vector (OpenCLIP proj) -> "pooled"
    rope: bool = False  # 2-D rotary embedding on patch tokens of q and k (EVA02)
    rope_ref_grid: int = 0  # grid the rotary frequencies were trained at (0: the model's grid)
    rope_temperature: float = 10000.0
    pos_resample_antialias: bool = True  # bicubic position-grid resize antialiased (timm) or plain (EVA-CLIP)
    pos_resample_offset: float = 0.0  # that resize's scale factor is (new grid + offset) / grid (0.1: DINOv2's hub)
    # layout
    qkv_fused: bool = True  # one qkv Linear in the checkpoint (else q/k/v projections)
    mlp_packed: bool = False  # gated fc1 stored as one Linear of width 2H, gate half first
    mask_token: bool = False  # keep DINOv2's (unused at inference) mask token so exports stay complete
    # compute
    dtype: str = "float32"  # activation / matmul dtype, e.g. bfloat16
    param_dtype: str = "float32"
    scan_layers: bool = False  # nn.scan over a uniform layer stack (fast compile for deep models)
    remat: bool = False  # rematerialize each block in the backward pass
    attention: str = "einsum"  # einsum | dot_product_attention | cudnn (see ATTENTION)

    def __post_init__(self) -> None:
        if not self.mlp_hidden:
            object.__setattr__(self, "mlp_hidden", (4 * self.width,) * self.depth)
        object.__setattr__(self, "mlp_hidden", tuple(int(h) for h in self.mlp_hidden))
        if self.global_pool == "map" and not self.pool_hidden and self.mlp_hidden:  # the head's MLP as the blocks'
            object.__setattr__(self, "pool_hidden", self.mlp_hidden[0])
        # config.json stores tuples as lists: back to (nested) tuples so loaded configs compare equal
        object.__setattr__(self, "layer_heads", tuple(int(h) for h in self.layer_heads))
        object.__setattr__(self, "value_dims", tuple(tuple(int(w) for w in ws) for ws in self.value_dims))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        checks = [
            (self.mlp_type in MLP_TYPES, f"mlp_type must be one of {MLP_TYPES}, got {self.mlp_type!r}"),
            (self.qkv_bias in QKV_BIAS, f"qkv_bias must be one of {QKV_BIAS}, got {self.qkv_bias!r}"),
            (self.global_pool in POOLS, f"global_pool must be one of {POOLS}, got {self.global_pool!r}"),
            (self.norm in NORMS, f"norm must be one of {NORMS}, got {self.norm!r}"),
            (self.qk_norm in QK_NORMS, f"qk_norm must be one of {QK_NORMS}, got {self.qk_norm!r}"),
            (self.attention in ATTENTION, f"attention must be one of {ATTENTION}, got {self.attention!r}"),
            (
                len(self.mlp_hidden) == self.depth,
                f"mlp_hidden has {len(self.mlp_hidden)} entries but depth is {self.depth}",
            ),
            (all(h >= 0 for h in self.mlp_hidden), f"mlp_hidden entries must be >= 0, got {self.mlp_hidden}"),
            (
                self.head_dim > 0 or self.width % self.num_heads == 0,
                f"width {self.width} is not divisible by num_heads {self.num_heads}; set head_dim",
            ),
            (
                self.img_size % self.patch_size == 0,
                f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}",
            ),
            (
                0 <= self.pos_embed_prefix <= self.num_prefix_tokens,
                f"pos_embed_prefix {self.pos_embed_prefix} exceeds the {self.num_prefix_tokens} prefix tokens",
            ),
            (self.global_pool != "token" or self.class_token, "global_pool='token' needs class_token=True"),
            (
                self.global_pool != "map" or (self.pool_hidden > 0 and self.width % self.num_heads == 0),
                f"global_pool='map' needs pool_hidden > 0 and width divisible by num_heads, got pool_hidden "
                f"{self.pool_hidden}, width {self.width}, num_heads {self.num_heads}",
            ),
            (
                self.global_pool != "map" or not (self.gated or self.mlp_norm or self.dist_token),
                "global_pool='map' (SigLIP's attention pool) takes a plain MLP (no swiglu, no mlp_norm) and no "
                "distillation token",
            ),
            (
                not self.scan_layers or len(set(self.mlp_hidden)) == 1,
                "scan_layers needs one MLP width for all layers; per-layer widths need scan_layers=False",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"ModelConfig {self.name!r}: {message}")
        self._validate_units()

    def _validate_units(self) -> None:
        """The per-layer units of a UVC slim model: layer_heads, value_dims, absent branches, scan_layers."""
        d, problem = self.attn_head_dim, None
        if self.layer_heads and len(self.layer_heads) != self.depth:
            problem = f"layer_heads has {len(self.layer_heads)} entries but depth is {self.depth}"
        elif not all(0 <= h <= self.num_heads for h in self.layer_heads):
            problem = f"layer_heads entries must be in 0..num_heads={self.num_heads}, got {self.layer_heads}"
        elif self.value_dims and len(self.value_dims) != self.depth:
            problem = f"value_dims has {len(self.value_dims)} entries but depth is {self.depth}"
        else:
            for layer in range(self.depth if self.value_dims else 0):
                widths = self.value_dims[layer]
                if len(widths) != self.heads(layer):
                    problem = (
                        f"value_dims[{layer}] has {len(widths)} widths but layer {layer} has {self.heads(layer)} "
                        "heads (layer_heads, else num_heads)"
                    )
                elif not all(1 <= w <= d for w in widths):
                    problem = f"value_dims[{layer}] entries must be in 1..attn_head_dim={d}, got {widths}"
                if problem:
                    break
        if problem is None:
            empty = [i for i in range(self.depth) if self.heads(i) == 0 and self.mlp_hidden[i] == 0]
            if empty:
                problem = (
                    f"layers {empty} have neither attention heads (layer_heads) nor MLP neurons (mlp_hidden): "
                    "drop such blocks from depth instead"
                )
            elif self.scan_layers and not self.uniform:
                problem = (
                    "scan_layers needs the same heads, value widths and MLP width in every layer; "
                    "per-layer units (layer_heads, value_dims, mlp_hidden) need scan_layers=False"
                )
        if problem:
            raise UserError(f"ModelConfig {self.name!r}: {problem}")

    def heads(self, layer: int) -> int:
        """Attention heads of `layer` (0: the layer has no attention branch)."""
        return self.layer_heads[layer] if self.layer_heads else self.num_heads

    def vdims(self, layer: int) -> tuple[int, ...]:
        """Value width of each head of `layer` (queries and keys keep attn_head_dim)."""
        return self.value_dims[layer] if self.value_dims else (self.attn_head_dim,) * self.heads(layer)

    @property
    def uniform(self) -> bool:
        """Every layer has the same heads, value widths and MLP width (scan_layers allowed)."""
        units = {(self.heads(i), self.vdims(i), self.mlp_hidden[i]) for i in range(self.depth)}
        return len(units) <= 1

    @property
    def full_units(self) -> bool:
        """No per-layer head or value-width pruning and no absent branch: the layout of an unpruned ViT (MLP
        widths may differ per layer)."""
        return not self.layer_heads and not self.value_dims and all(h > 0 for h in self.mlp_hidden)

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim or self.width // self.num_heads

    @property
    def attn_dim(self) -> int:
        return self.attn_head_dim * self.num_heads

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + int(self.dist_token) + self.reg_tokens

    @property
    def gated(self) -> bool:
        return self.mlp_type == "swiglu"

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown ModelConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))
