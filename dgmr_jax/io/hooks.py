"""Tensor layout hooks between PyTorch state-dict entries and Flax params, each an exact inverse pair.

A hook maps a list of torch arrays to a list of flax arrays (to_flax) and back (to_torch); only
transposes, reshapes, splits and concatenations, so a round trip reproduces the bits.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

Arrays = list[np.ndarray]


def _copy(xs: Arrays) -> Arrays:
    return list(xs)


def _transpose(xs: Arrays) -> Arrays:
    return [np.ascontiguousarray(x.T) for x in xs]


def _conv_to_flax(xs: Arrays) -> Arrays:  # (out, in, kh, kw) -> (kh, kw, in, out)
    return [np.ascontiguousarray(xs[0].transpose(2, 3, 1, 0))]


def _conv_to_torch(xs: Arrays) -> Arrays:
    return [np.ascontiguousarray(xs[0].transpose(3, 2, 0, 1))]


def _patch_linear_to_flax(xs: Arrays) -> Arrays:  # Linear on (p, p, 3)-flattened patches (D, p*p*3) -> (p, p, 3, D)
    p = math.isqrt(xs[0].shape[1] // 3)
    return [np.ascontiguousarray(xs[0].T.reshape(p, p, 3, -1))]


def _patch_linear_to_torch(xs: Arrays) -> Arrays:
    return [np.ascontiguousarray(xs[0].reshape(-1, xs[0].shape[-1]).T)]


def _qkv_to_flax(xs: Arrays) -> Arrays:  # separate q, k, v (out, in) -> fused kernel (in, 3 out)
    return [np.ascontiguousarray(np.concatenate(xs, axis=0).T)]


def _qkv_to_torch(xs: Arrays) -> Arrays:
    return [np.ascontiguousarray(w) for w in np.split(xs[0].T, 3, axis=0)]


def _packed_to_flax(xs: Arrays) -> Arrays:  # packed gated fc1 (2H, ...) -> gate, value halves
    halves = np.split(xs[0], 2, axis=0)
    return [np.ascontiguousarray(h.T) for h in halves] if xs[0].ndim == 2 else halves


def _packed_to_torch(xs: Arrays) -> Arrays:
    return [np.ascontiguousarray(np.concatenate([x.T if x.ndim == 2 else x for x in xs], axis=0))]


def _in_proj_to_flax(xs: Arrays) -> Arrays:  # packed q, k, v rows (3D, ...) -> q (D, ...), kv (2D, ...), as flax
    q, kv = np.split(xs[0], [xs[0].shape[0] // 3], axis=0)
    return [np.ascontiguousarray(x.T) for x in (q, kv)] if xs[0].ndim == 2 else [q, kv]


def _to_scalar(xs: Arrays) -> Arrays:  # transformers' (1,) parameters (SigLIP's logit_scale, logit_bias) -> ()
    return [xs[0].reshape(())]


def _unbatch(xs: Arrays) -> Arrays:  # (1, N, D) -> (N, D)
    return [xs[0][0]]


def _batch(xs: Arrays) -> Arrays:  # (N, D) -> (1, N, D)
    return [xs[0][None]]


def _vector_to_token(xs: Arrays) -> Arrays:  # OpenCLIP class_embedding (D,) -> (1, 1, D)
    return [xs[0].reshape(1, 1, -1)]


def _token_to_vector(xs: Arrays) -> Arrays:
    return [xs[0].reshape(-1)]


def _columns_to_fused(xs: Arrays) -> Arrays:  # q, k, v as (in, out) MatMul weights or biases -> (in, 3 out)
    return [np.ascontiguousarray(np.concatenate(xs, axis=-1))]


def _fused_to_columns(xs: Arrays) -> Arrays:
    return [np.ascontiguousarray(w) for w in np.split(xs[0], 3, axis=-1)]


def _join_tokens(xs: Arrays) -> Arrays:  # class-token (1, 1, D) and grid (1, N, D) position rows -> (1, 1 + N, D)
    return [np.ascontiguousarray(np.concatenate([x.reshape(1, -1, x.shape[-1]) for x in xs], axis=1))]


def _split_tokens(xs: Arrays) -> Arrays:
    return [np.ascontiguousarray(xs[0][:, :1]), np.ascontiguousarray(xs[0][:, 1:])]


HOOKS: dict[str, tuple[Callable[[Arrays], Arrays], Callable[[Arrays], Arrays]]] = {
    "copy": (_copy, _copy),
    "linear": (_transpose, _transpose),
    "conv": (_conv_to_flax, _conv_to_torch),
    "patch_linear": (_patch_linear_to_flax, _patch_linear_to_torch),  # Siglip2's patch embedding
    "qkv": (_qkv_to_flax, _qkv_to_torch),
    "packed": (_packed_to_flax, _packed_to_torch),
    "in_proj": (_in_proj_to_flax, _packed_to_torch),  # nn.MultiheadAttention's in_proj -> a query and a kv Linear
    "rows": (_batch, _unbatch),
    "vector": (_vector_to_token, _token_to_vector),
    "scalar": (_to_scalar, _token_to_vector),
    "qkv_columns": (_columns_to_fused, _fused_to_columns),  # ONNX graphs: per-role MatMul weights
    "prefix_grid": (_join_tokens, _split_tokens),  # ONNX graphs: class-token and grid position rows
}
