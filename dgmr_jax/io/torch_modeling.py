"""A dgmr-jax vision tower in plain PyTorch, written as modeling.py by `dgmr-jax export --format torch`.

    import modeling
    model = modeling.load("OUT")          # an nn.Module in eval mode, float32
    pooled = model(images)                # images: normalized (B, 3, H, W) -> pooled features (B, D)
    model.outputs(images)                 # {"tokens", "pooled"[, "logits"]}, as dgmr-jax's forward

It needs only torch: the folder's model.safetensors is read here by hand. Every layer is built at the sizes
config.json gives it (per-layer heads, per-head value widths, MLP widths, absent attention or MLP branches), so
nothing is padded and the matmuls cost what dgmr-jax's count_flops counts.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# config.json fields that change what the model computes, with the values implemented here (None: any value).
# dgmr-jax reads this table (and IGNORES) from this file's text and refuses to export a config outside it.
IMPLEMENTS = {
    "img_size": None,
    "patch_size": None,
    "width": None,
    "depth": None,
    "num_heads": None,
    "head_dim": None,
    "mlp_hidden": None,
    "layer_heads": None,
    "value_dims": None,
    "mlp_type": ("gelu", "gelu_tanh", "quick_gelu", "swiglu"),
    "mlp_norm": None,
    "qkv_bias": ("full", "qv", "none"),
    "attn_norm": None,
    "layer_scale": None,
    "post_norm": None,
    "norm": ("layernorm", "rmsnorm"),
    "qk_norm": ("", "full"),
    "norm_eps": None,
    "patch_bias": None,
    "class_token": None,
    "dist_token": None,
    "reg_tokens": None,
    "pos_embed_prefix": None,
    "pre_norm": None,
    "final_norm": None,
    "fc_norm": None,
    "global_pool": ("token", "avg", "map"),
    "pool_hidden": None,
    "num_classes": None,
    "head_bias": None,
    "proj_dim": None,
    "rope": None,
    "rope_ref_grid": None,
    "rope_temperature": None,
    "pos_resample_antialias": None,
    "pos_resample_offset": None,
    "mask_token": None,
}
# fields that only say how dgmr-jax names, stores or runs the model; here the weights load as float32
IGNORES = ("name", "qkv_fused", "mlp_packed", "dtype", "param_dtype", "scan_layers", "remat", "attention")

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
}


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """{name: tensor} of a .safetensors file: an 8-byte little-endian header length, a JSON header giving each
    tensor's dtype, shape and byte range, then the raw little-endian bytes."""
    data = bytearray(Path(path).read_bytes())
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    header.pop("__metadata__", None)
    tensors = {}
    for name, entry in header.items():
        dtype, (start, stop) = _DTYPES[entry["dtype"]], entry["data_offsets"]
        count = (stop - start) // dtype.itemsize
        flat = torch.frombuffer(data, dtype=dtype, count=count, offset=8 + size + start) if count else torch.empty(0)
        tensors[name] = flat.reshape(entry["shape"])
    return tensors


class Config:
    """config.json's model fields as attributes, with the per-layer sizes."""

    def __init__(self, fields: dict):
        self.__dict__.update(fields)
        self.attn_head_dim = self.head_dim or self.width // self.num_heads
        self.grid = self.img_size // self.patch_size

    def heads(self, layer: int) -> int:
        """Attention heads of `layer` (0: no attention branch)."""
        return self.layer_heads[layer] if self.layer_heads else self.num_heads

    def vdims(self, layer: int) -> tuple[int, ...]:
        """Value width of each head of `layer` (queries and keys keep attn_head_dim)."""
        return tuple(self.value_dims[layer]) if self.value_dims else (self.attn_head_dim,) * self.heads(layer)


def _norm(cfg: Config, dim: int) -> nn.Module:
    """The tower's norm over `dim` features: LayerNorm or RMSNorm (scale only), per cfg.norm."""
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps)


def rope_tables(head_dim: int, grid: tuple[int, int], ref: tuple[int, int], temperature: float) -> torch.Tensor:
    """(sin, cos) stacked, (2, H*W, head_dim): EVA02's axial RoPE angles in interleaved pairs, positions scaled
    to the grid the frequencies were trained at."""
    bands = head_dim // 4
    freqs = 1.0 / temperature ** (torch.arange(bands, dtype=torch.float32) / bands)
    axes = [torch.arange(n, dtype=torch.float32) / n * r for n, r in zip(grid, ref, strict=True)]
    positions = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (H, W, 2)
    angles = (positions[..., None] * freqs).reshape(-1, 2 * bands).repeat_interleave(2, dim=-1)
    return torch.stack([angles.sin(), angles.cos()])


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the last len(rope[0]) tokens of x (..., N, hd): (x0, x1) -> (x0 cos - x1 sin,
    x1 cos + x0 sin); the prefix tokens are left as they are."""
    sin, cos = rope
    start = x.shape[-2] - sin.shape[0]
    patches = x[..., start:, :]
    pairs = patches.reshape(*patches.shape[:-1], -1, 2)
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).reshape(patches.shape)
    return torch.cat([x[..., :start, :], patches * cos + rotated * sin], dim=-2)


class Attention(nn.Module):
    """Multi-head self-attention with per-head value widths: queries and keys of attn_head_dim per head, then each
    head's values at its own width (the qkv columns: q of every head, k of every head, the values head by head)."""

    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        self.heads, self.hd, vdims = cfg.heads(layer), cfg.attn_head_dim, cfg.vdims(layer)
        self.split = (self.heads * self.hd, self.heads * self.hd, sum(vdims))
        self.qkv = nn.Linear(cfg.width, sum(self.split), bias=cfg.qkv_bias == "full")
        if cfg.qkv_bias == "qv":
            self.q_bias, self.v_bias = nn.Parameter(torch.zeros(self.split[0])), nn.Parameter(torch.zeros(sum(vdims)))
        self.qkv_bias = cfg.qkv_bias
        self.q_norm = nn.RMSNorm(self.split[0], eps=cfg.norm_eps) if cfg.qk_norm == "full" else None
        self.k_norm = nn.RMSNorm(self.split[0], eps=cfg.norm_eps) if cfg.qk_norm == "full" else None
        self.norm = _norm(cfg, sum(vdims)) if cfg.attn_norm else None
        self.proj = nn.Linear(sum(vdims), cfg.width)
        # heads grouped by value width, one batched matmul per width: weights @ values costs N * N * sum(vdims)
        starts = [sum(vdims[:h]) for h in range(self.heads)]
        self.groups, order = [], []
        for width in sorted(set(vdims)):
            group = [h for h, w in enumerate(vdims) if w == width]
            columns = [starts[h] + j for h in group for j in range(width)]
            self.groups.append((width, len(group)))
            self.register_buffer(f"_heads_{width}", torch.tensor(group), persistent=False)
            self.register_buffer(f"_columns_{width}", torch.tensor(columns), persistent=False)
            order += columns
        self.register_buffer("_order", torch.argsort(torch.tensor(order)), persistent=False)

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x)
        if self.qkv_bias == "qv":
            qkv = qkv + torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        q, k, v = qkv.split(self.split, dim=-1)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = (t.reshape(b, n, self.heads, self.hd).transpose(1, 2) for t in (q, k))
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        logits = (q * self.hd**-0.5) @ k.transpose(-1, -2)
        weights = torch.softmax(logits.float(), dim=-1).to(v.dtype)
        parts = []
        for width, count in self.groups:
            heads, columns = getattr(self, f"_heads_{width}"), getattr(self, f"_columns_{width}")
            values = v[..., columns].reshape(b, n, count, width).transpose(1, 2)
            parts.append((weights[:, heads] @ values).transpose(1, 2).reshape(b, n, count * width))
        out = torch.cat(parts, dim=-1)[..., self._order]
        if self.norm is not None:
            out = self.norm(out)
        return self.proj(out)


def activation(kind: str, h: torch.Tensor) -> torch.Tensor:
    """The MLP activation of a non-gated mlp_type: GELU (erf), its tanh approximation or QuickGELU."""
    if kind == "quick_gelu":
        return h * torch.sigmoid(1.702 * h)
    return F.gelu(h, approximate="tanh" if kind == "gelu_tanh" else "none")


class Mlp(nn.Module):
    """fc2(act(fc1 x)) or, gated, fc2(silu(fc1_g x) * fc1_x x); an optional norm over the hidden width."""

    def __init__(self, cfg: Config, hidden: int):
        super().__init__()
        self.kind = cfg.mlp_type
        if self.kind == "swiglu":
            self.fc1_g, self.fc1_x = nn.Linear(cfg.width, hidden), nn.Linear(cfg.width, hidden)
        else:
            self.fc1 = nn.Linear(cfg.width, hidden)
        self.norm = _norm(cfg, hidden) if cfg.mlp_norm else None
        self.fc2 = nn.Linear(hidden, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            h = F.silu(self.fc1_g(x)) * self.fc1_x(x)
        else:
            h = activation(self.kind, self.fc1(x))
        if self.norm is not None:
            h = self.norm(h)
        return self.fc2(h)


class AttentionPool(nn.Module):
    """SigLIP's attention pool: a learned probe queries the tokens (num_heads heads), proj, then a LayerNorm + MLP
    residual; (B, N, D) -> (B, D)."""

    def __init__(self, cfg: Config):
        super().__init__()
        w, self.heads, self.kind = cfg.width, cfg.num_heads, cfg.mlp_type
        self.latent = nn.Parameter(torch.zeros(1, 1, w))
        self.q, self.kv, self.proj = nn.Linear(w, w), nn.Linear(w, 2 * w), nn.Linear(w, w)
        self.norm = _norm(cfg, w)
        self.fc1, self.fc2 = nn.Linear(w, cfg.pool_hidden), nn.Linear(cfg.pool_hidden, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        hd = w // self.heads
        q = self.q(self.latent.repeat(b, 1, 1)).reshape(b, self.heads, 1, hd)  # per image, as count_flops counts
        k, v = self.kv(x).reshape(b, n, 2, self.heads, hd).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(((q * hd**-0.5) @ k.transpose(-1, -2)).float(), dim=-1).to(v.dtype)
        pooled = self.proj((weights @ v).reshape(b, w))
        h = activation(self.kind, self.fc1(self.norm(pooled)))
        return pooled + self.fc2(h)


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class Block(nn.Module):
    """Pre-norm (x + f(norm x)) or post-norm (x + norm(f x)) block; a branch with no heads or no MLP neurons is
    absent (it adds nothing)."""

    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        self.post_norm = cfg.post_norm
        self.attn = self.mlp = None
        if cfg.heads(layer):
            self.norm1, self.attn = _norm(cfg, cfg.width), Attention(cfg, layer)
            self.ls1 = LayerScale(cfg.width) if cfg.layer_scale else nn.Identity()
        if cfg.mlp_hidden[layer]:
            self.norm2, self.mlp = _norm(cfg, cfg.width), Mlp(cfg, cfg.mlp_hidden[layer])
            self.ls2 = LayerScale(cfg.width) if cfg.layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
        if self.attn is not None:
            x = x + (
                self.ls1(self.norm1(self.attn(x, rope))) if self.post_norm else self.ls1(self.attn(self.norm1(x), rope))
            )
        if self.mlp is not None:
            x = x + (self.ls2(self.norm2(self.mlp(x))) if self.post_norm else self.ls2(self.mlp(self.norm2(x))))
        return x


class VisionTransformer(nn.Module):
    """The vision tower: patches and prefix tokens (class, distillation, registers) with learned positions (and
    RoPE), the blocks, then pooling (class token, distillation average, patch mean or attention pool), head and
    projection."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg, w = cfg, cfg.width
        self.patch_embed = nn.Conv2d(3, w, cfg.patch_size, stride=cfg.patch_size, bias=cfg.patch_bias)
        for name, count in (("cls_token", int(cfg.class_token)), ("dist_token", int(cfg.dist_token))):
            if count:
                setattr(self, name, nn.Parameter(torch.zeros(1, count, w)))
        if cfg.reg_tokens:
            self.reg_token = nn.Parameter(torch.zeros(1, cfg.reg_tokens, w))
        if cfg.mask_token:  # unused at inference; kept so the package holds every weight
            self.mask_token = nn.Parameter(torch.zeros(1, w))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.pos_embed_prefix + cfg.grid**2, w))
        self.norm_pre = _norm(cfg, w) if cfg.pre_norm else None
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.depth))
        self.norm = _norm(cfg, w) if cfg.final_norm else None
        self.attn_pool = AttentionPool(cfg) if cfg.global_pool == "map" else None
        self.fc_norm = _norm(cfg, w) if cfg.fc_norm else None
        if cfg.num_classes:
            self.head = nn.Linear(w, cfg.num_classes, bias=cfg.head_bias)
            if cfg.dist_token:
                self.head_dist = nn.Linear(w, cfg.num_classes, bias=cfg.head_bias)
        self.proj = nn.Linear(w, cfg.proj_dim, bias=False) if cfg.proj_dim else None

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens plus their positions (resampled bicubically to another grid), after the prefix tokens
        plus theirs."""
        cfg, npos = self.cfg, self.cfg.pos_embed_prefix
        x = self.patch_embed(images)
        b, _, gh, gw = x.shape
        pos = self.pos_embed[:, npos:]
        if (gh, gw) != (cfg.grid, cfg.grid):
            grid = pos.reshape(1, cfg.grid, cfg.grid, -1).permute(0, 3, 1, 2)
            # to (gh, gw); with an offset as facebookresearch DINOv2 does it, by scale factor (floor of it: gh, gw)
            off = cfg.pos_resample_offset
            size = dict(scale_factor=((gh + off) / cfg.grid, (gw + off) / cfg.grid)) if off else dict(size=(gh, gw))
            grid = F.interpolate(
                grid, **size, mode="bicubic", align_corners=False, antialias=cfg.pos_resample_antialias
            )
            pos = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
        x = x.flatten(2).transpose(1, 2) + pos
        tokens = [getattr(self, n) for n in ("cls_token", "dist_token", "reg_token") if hasattr(self, n)]
        if not tokens:
            return x
        prefix = torch.cat(tokens, dim=1)
        prefix = torch.cat([prefix[:, :npos] + self.pos_embed[:, :npos], prefix[:, npos:]], dim=1)
        return torch.cat([prefix.expand(b, -1, -1), x], dim=1)

    def outputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"tokens", "pooled"[, "logits"]} of normalized (B, 3, H, W) images, as dgmr-jax's forward."""
        cfg, p = self.cfg, self.cfg.patch_size
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] % p or images.shape[3] % p:
            raise ValueError(
                f"images must be (batch, 3, H, W) with H and W multiples of {p}, got {tuple(images.shape)}"
            )
        x = self._embed(images)
        if self.norm_pre is not None:
            x = self.norm_pre(x)
        rope = None
        if cfg.rope:
            ref = cfg.rope_ref_grid or cfg.grid
            grid = (images.shape[2] // p, images.shape[3] // p)
            rope = rope_tables(cfg.attn_head_dim, grid, (ref, ref), cfg.rope_temperature).to(x)
        for block in self.blocks:
            x = block(x, rope)
        if self.norm is not None:
            x = self.norm(x)
        return {"tokens": x, **self._pool(x)}

    def _pool(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The pooled vector (fc_norm, projection) and the logits, if the model has a head."""
        cfg, out = self.cfg, {}
        if cfg.dist_token:
            pooled, pooled_dist = x[:, 0], x[:, 1]
        elif cfg.global_pool == "token":
            pooled = x[:, 0]
        else:
            start = int(cfg.class_token) + int(cfg.dist_token) + cfg.reg_tokens
            pooled = self.attn_pool(x[:, start:]) if self.attn_pool is not None else x[:, start:].mean(dim=1)
        if self.fc_norm is not None:
            pooled = self.fc_norm(pooled)
        if cfg.num_classes:
            out["logits"] = self.head(pooled)
            if cfg.dist_token:
                out["logits"] = (out["logits"] + self.head_dist(pooled_dist)) / 2
        if cfg.dist_token:
            pooled = (pooled + pooled_dist) / 2
        out["pooled"] = self.proj(pooled) if self.proj is not None else pooled
        return out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The pooled features (B, D) of normalized (B, 3, H, W) images."""
        return self.outputs(images)["pooled"]


def load(folder: str | Path) -> VisionTransformer:
    """The model in `folder` (config.json, model.safetensors), weights loaded strictly, in eval mode."""
    folder = Path(folder)
    spec = json.loads((folder / "config.json").read_text())
    model = VisionTransformer(Config(spec["config"]))
    model.load_state_dict(read_safetensors(folder / "model.safetensors"), strict=True)
    return model.eval()
