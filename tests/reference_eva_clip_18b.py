"""PyTorch reference of the EVA-CLIP-8B / EVA-CLIP-18B vision towers, for parity and key-for-key tests.

No pip package ships these models, so this module is written here from the architecture that the official
baaivision/EVA code builds (EVA-CLIP-18B/shinji/eva_clip: model.py `_build_vision_tower` and `RMSnorm`,
eva_vit_model.py `EVAVisionTransformer`, `Block`, `Attention`, `Mlp`) with the flags of its model_configs
EVA-CLIP-8B.json / EVA-CLIP-18B.json: it was read, not copied. What those flags select, and so what this
module implements: RMSNorm (weight only, eps 1e-6, mean of squares in float32) for every norm; a fused `qkv`
Linear without bias (qkv_bias false, subln off); plain softmax attention scaled by head_dim ** -0.5 (xattn's
memory-efficient kernel computes the same); `proj` with bias; a GELU `fc1`/`fc2` MLP; no layer scale, no
RoPE, no relative position bias; pre-norm blocks (8B) or post-norm blocks x + norm(f(x)) (18B, postnorm true);
the final `norm`, class-token pooling and a `head` without bias. Parameter names are the checkpoint's
(under "visual." in a full CLIP checkpoint).
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight; the mean of squares is taken in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean_square = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(mean_square + self.eps))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        weights = ((q * (d // self.heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, postnorm: bool):
        super().__init__()
        self.norm1, self.attn = RMSNorm(dim), Attention(dim, heads)
        self.norm2, self.mlp = RMSNorm(dim), Mlp(dim, hidden)
        self.postnorm = postnorm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.postnorm:
            x = x + self.norm1(self.attn(x))
            return x + self.norm2(self.mlp(x))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class EvaClipVision(nn.Module):
    """The vision tower: forward returns {"tokens" (after the final norm), "pooled" (class token), "logits"}."""

    def __init__(self, img: int, patch: int, dim: int, depth: int, heads: int, hidden: int, embed: int, postnorm: bool):
        super().__init__()
        self.patch_embed = PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (img // patch) ** 2 + 1, dim))
        self.blocks = nn.ModuleList([Block(dim, heads, hidden, postnorm) for _ in range(depth)])
        self.norm = RMSNorm(dim)
        self.head = nn.Linear(dim, embed, bias=False)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        tokens = self.norm(x)
        return {"tokens": tokens, "pooled": tokens[:, 0], "logits": self.head(tokens[:, 0])}


# vision_cfg of EVA-CLIP-8B.json, EVA-CLIP-8B-plus.json (the 448 px EVA-CLIP-8B-448) and EVA-CLIP-18B.json,
# with embed_dim (the head width) and mlp_ratio 5 as the hidden width
OFFICIAL = {
    "EVA-CLIP-8B": dict(img=224, patch=14, dim=4096, depth=32, heads=32, hidden=20480, embed=1280, postnorm=False),
    "EVA-CLIP-8B-448": dict(img=448, patch=14, dim=4096, depth=32, heads=32, hidden=20480, embed=1280, postnorm=False),
    "EVA-CLIP-18B": dict(img=224, patch=14, dim=5120, depth=48, heads=40, hidden=25600, embed=1536, postnorm=True),
}
