"""Position embeddings: bicubic resampling of learned grids (as PyTorch does it) and 2-D RoPE tables."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from dgmr_jax.core.errors import UserError


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys cubic convolution kernel with parameter a (PyTorch: -0.75 plain, -0.5 antialiased)."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def resize_matrix(in_size: int, out_size: int, antialias: bool, offset: float = 0.0) -> np.ndarray:
    """(out, in) float64 matrix equal to torch's 1-D bicubic interpolation (align_corners=False).

    jax.image.resize uses a different cubic (a=-0.5, no index clamping), so PyTorch position grids
    would drift; this reproduces F.interpolate(mode="bicubic", antialias=...) instead. A nonzero `offset` is
    facebookresearch DINOv2's: it calls F.interpolate with scale_factor=(out_size + offset) / in_size, which samples
    the source at (i + 0.5) / scale_factor - 0.5, a slightly narrower stretch than size=out_size.
    """
    scale = in_size / (out_size + offset)
    m = np.zeros((out_size, in_size))
    for i in range(out_size):
        if antialias:  # PIL-style separable filter, support widened when downsampling
            support = 2.0 * scale if scale >= 1.0 else 2.0
            center = scale * (i + 0.5)
            inv = 1.0 / scale if scale >= 1.0 else 1.0
            lo = max(int(center - support + 0.5), 0)
            hi = min(int(center + support + 0.5), in_size)
            js = np.arange(lo, hi)
            w = _cubic((js - center + 0.5) * inv, -0.5)
            m[i, js] = w / w.sum()
        else:
            src = (i + 0.5) * scale - 0.5
            x0 = math.floor(src)
            t = src - x0
            for off, w in zip(range(-1, 3), _cubic(np.array([t + 1, t, 1 - t, 2 - t]), -0.75), strict=True):
                m[i, min(max(x0 + off, 0), in_size - 1)] += w
    return m


def resample_grid(grid: jnp.ndarray, new_hw: tuple[int, int], antialias: bool, offset: float = 0.0) -> jnp.ndarray:
    """Resize a (H, W, C) grid of embeddings to new_hw with torch-equal bicubic interpolation (resize_matrix)."""
    h, w = grid.shape[:2]
    if (h, w) == tuple(new_hw):
        return grid
    mh = jnp.asarray(resize_matrix(h, new_hw[0], antialias, offset), jnp.float32)
    mw = jnp.asarray(resize_matrix(w, new_hw[1], antialias, offset), jnp.float32)
    out = jnp.einsum("oh,hwc,pw->opc", mh, grid.astype(jnp.float32), mw, precision="highest")
    return out.astype(grid.dtype)


def resample_pos_embed(
    pos_embed: jnp.ndarray, num_prefix: int, new_hw: tuple[int, int], antialias: bool = True, offset: float = 0.0
) -> jnp.ndarray:
    """Resample a (1, prefix + H*W, C) position embedding to a new patch grid; prefix rows are kept."""
    prefix, patches = pos_embed[:, :num_prefix], pos_embed[0, num_prefix:]
    side = math.isqrt(patches.shape[0])
    if side * side != patches.shape[0]:
        raise UserError(f"position embedding has {patches.shape[0]} patch rows, not a square grid")
    grid = resample_grid(patches.reshape(side, side, -1), new_hw, antialias, offset)
    return jnp.concatenate([prefix, grid.reshape(1, -1, grid.shape[-1])], axis=1)


def rope_tables(
    head_dim: int, grid_hw: tuple[int, int], ref_hw: tuple[int, int], temperature: float
) -> tuple[np.ndarray, np.ndarray]:
    """(sin, cos) of shape (H*W, head_dim) for EVA02's axial RoPE, interleaved pair layout.

    A quarter of head_dim are frequencies per axis; positions are scaled to the reference grid
    so a model run at another resolution sees the angles it was trained on.
    """
    bands = head_dim // 4
    freqs = 1.0 / temperature ** (np.arange(bands, dtype=np.float32) / np.float32(bands))
    axes = [
        np.arange(n, dtype=np.float32) / np.float32(n) * np.float32(r) for n, r in zip(grid_hw, ref_hw, strict=True)
    ]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)  # (H, W, 2)
    angles = (grid[..., None] * freqs).reshape(-1, 2 * bands)  # (H*W, [y bands, x bands])
    angles = np.repeat(angles, 2, axis=-1)
    return np.sin(angles), np.cos(angles)


def apply_rope(x: jnp.ndarray, sin: jnp.ndarray, cos: jnp.ndarray) -> jnp.ndarray:
    """Rotate interleaved pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin); x: (..., N, hd)."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    sin, cos = sin.astype(x.dtype), cos.astype(x.dtype)
    return x * cos + rotated * sin
