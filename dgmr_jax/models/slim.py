"""UVC slim models: which units (attention heads, value dims inside heads, MLP neurons, whole blocks) a model keeps.

Two forms of the same pruned model:

- the masked model, which the UVC search runs: the full model with `masked_params` (head mask mh (H,), value-dim
  mask md (H, d) and neuron mask mn (M,) scale the rows of attn/proj/kernel (row h*d + j by mh[h] * md[h, j]) and of
  mlp/fc2/kernel (row i by mn[i])) and `forward(..., gates=)` (block gate pi: x + pi * (Block(x) - x));
- the slim model, which extraction produces: `slice_units(cfg, params, plan)` cuts the kept units out, giving a
  config with per-layer `layer_heads`, `value_dims` and `mlp_hidden` and params holding only those units.

At hard 0/1 masks and gates the two compute the same function (float32 to ~1e-6, float64 to ~1e-15), with two
qualifications:

- A removed branch. With every head of a layer masked the masked model still adds the proj bias (every neuron
  masked: the fc2 bias), while a slim layer without that branch adds nothing. The masked form of a removed branch is
  therefore a branch gate of 0: `masked_params(..., attn_gate=, mlp_gate=)` scale a whole branch's output (pre-norm
  blocks: the proj / fc2 kernel and bias; post-norm blocks: norm1 / norm2, which follow the branch). `branch_gates`
  gives the gates that match hard masks (0 where a branch keeps nothing) and `plan_from_masks` the plan.
- Norms inside a pruned width (qk_norm="full" over all heads' q and k, attn_norm over the attention output,
  mlp_norm over the hidden layer) take their statistics over the units that exist: in the slim model over the kept
  ones, in the masked model over all of them, so row masks alone do not reproduce the slim model there. Inside
  `masked_norm_statistics(cfg, ...)` the masked model's norms weight their statistics by the masks, which at hard
  masks is exactly the slim model's normalization.

PyTorch export (`pad_units`): timm's Attention has one head width and a Block always has both branches, so a slim
model is exported with each head's values padded to attn_head_dim with exact zeros (v rows of qkv, v_bias, proj
input columns), a removed attention branch as a 1-head attention and a removed MLP as a width-1 MLP whose tensors
(with their norm and layer scale) are all exactly zero, so the branch adds exactly 0. The returned plan slices the
padded model back to the slim one bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dgmr_jax.core.errors import UserError
from dgmr_jax.models.config import ModelConfig
from dgmr_jax.models.tree import Params, flatten, is_scanned, stack_blocks, unflatten, unstack_blocks

_ATTN_PARTS = ("norm1", "attn", "ls1")
_MLP_PARTS = ("norm2", "mlp", "ls2")


@dataclasses.dataclass(frozen=True)
class UnitPlan:
    """What one ORIGINAL layer keeps: the block, its heads (sorted; empty: no attention branch), each kept head's
    value dims (sorted) and its MLP neurons (sorted; empty: no MLP branch)."""

    keep_block: bool
    heads: tuple[int, ...]
    dims: tuple[tuple[int, ...], ...]
    neurons: tuple[int, ...]


Plan = tuple[UnitPlan, ...]  # one UnitPlan per original layer


def full_plan(cfg: ModelConfig) -> Plan:
    """The plan that keeps every unit of cfg (slice_units with it returns cfg and params unchanged)."""
    return tuple(
        UnitPlan(
            keep_block=True,
            heads=tuple(range(cfg.heads(i))),
            dims=tuple(tuple(range(w)) for w in cfg.vdims(i)),
            neurons=tuple(range(cfg.mlp_hidden[i])),
        )
        for i in range(cfg.depth)
    )


def _sorted_unique(xs: Sequence[int], bound: int) -> bool:
    return all(0 <= x < bound for x in xs) and all(a < b for a, b in zip(xs, xs[1:], strict=False))


def check_plan(cfg: ModelConfig, plan: Sequence[UnitPlan]) -> None:
    """Raise ValueError naming the first layer and field of `plan` that does not fit cfg."""
    if len(plan) != cfg.depth:
        raise UserError(f"the plan has {len(plan)} layers but the model has depth {cfg.depth}")
    for i, unit in enumerate(plan):
        heads, vdims, hidden = cfg.heads(i), cfg.vdims(i), cfg.mlp_hidden[i]
        where = f"plan layer {i}"
        if not _sorted_unique(unit.heads, heads):
            raise UserError(f"{where}: heads {unit.heads} must be sorted, unique and in 0..{heads - 1}")
        if len(unit.dims) != len(unit.heads):
            raise UserError(f"{where}: dims has {len(unit.dims)} entries but {len(unit.heads)} heads are kept")
        for h, dims in zip(unit.heads, unit.dims, strict=True):
            if not dims or not _sorted_unique(dims, vdims[h]):
                raise UserError(
                    f"{where}: head {h} keeps value dims {dims}; they must be non-empty, sorted, unique and in "
                    f"0..{vdims[h] - 1} (drop a head that keeps no dim)"
                )
        if not _sorted_unique(unit.neurons, hidden):
            raise UserError(f"{where}: neurons must be sorted, unique and in 0..{hidden - 1}")
        if unit.keep_block and not unit.heads and not unit.neurons:
            raise UserError(f"{where}: the block keeps neither heads nor neurons (the identity): set keep_block=False")
    if not any(unit.keep_block for unit in plan):
        raise UserError("the plan keeps no block")


def _value_starts(vdims: Sequence[int]) -> np.ndarray:
    return np.cumsum((0, *vdims))


def _unit_columns(cfg: ModelConfig, layer: int, unit: UnitPlan) -> tuple[np.ndarray, np.ndarray]:
    """(q/k columns, value columns) of the kept heads and dims, within q (H*d) and within the values (V)."""
    d, starts = cfg.attn_head_dim, _value_starts(cfg.vdims(layer))
    q = np.asarray([h * d + j for h in unit.heads for j in range(d)], np.int64)
    v = np.asarray([starts[h] + j for h, dims in zip(unit.heads, unit.dims, strict=True) for j in dims], np.int64)
    return q, v


def _slice_attn(cfg: ModelConfig, attn: Params, q: np.ndarray, v: np.ndarray, qk_width: int) -> Params:
    cols = np.concatenate([q, qk_width + q, 2 * qk_width + v])
    out: Params = {}
    for name, layer in attn.items():
        if name == "qkv":
            out[name] = {k: np.asarray(a)[..., cols] for k, a in layer.items()}
        elif name == "proj":
            out[name] = {"kernel": np.asarray(layer["kernel"])[v], "bias": layer["bias"]}
        elif name in ("q_norm", "k_norm"):
            out[name] = {k: np.asarray(a)[q] for k, a in layer.items()}
        elif name == "norm":  # attn_norm over the attention output
            out[name] = {k: np.asarray(a)[v] for k, a in layer.items()}
        elif name == "q_bias":
            out[name] = np.asarray(layer)[q]
        elif name == "v_bias":
            out[name] = np.asarray(layer)[v]
        else:
            raise ValueError(f"slice_units does not know the attention param {name!r}")
    return out


def slice_mlp(mlp: Params, idx: np.ndarray) -> Params:
    """Keep hidden neurons idx: fc1* columns and biases, hidden-norm entries, fc2 rows."""
    out: Params = {}
    for name, layer in mlp.items():
        if name == "fc2":
            out[name] = {"kernel": np.asarray(layer["kernel"])[idx], "bias": layer["bias"]}
        else:  # fc1, fc1_g, fc1_x (column per neuron) and the hidden norm (entry per neuron)
            out[name] = {k: np.asarray(a)[..., idx] if k == "kernel" else np.asarray(a)[idx] for k, a in layer.items()}
    return out


def _slice_block(cfg: ModelConfig, layer: int, block: Params, unit: UnitPlan) -> Params:
    out = {k: v for k, v in block.items() if k not in _ATTN_PARTS + _MLP_PARTS}
    if unit.heads:
        q, v = _unit_columns(cfg, layer, unit)
        out.update({k: block[k] for k in ("norm1", "ls1") if k in block})
        out["attn"] = _slice_attn(cfg, block["attn"], q, v, cfg.heads(layer) * cfg.attn_head_dim)
    if unit.neurons:
        out.update({k: block[k] for k in ("norm2", "ls2") if k in block})
        out["mlp"] = slice_mlp(block["mlp"], np.asarray(unit.neurons, np.int64))
    return out


def slim_config(cfg: ModelConfig, plan: Sequence[UnitPlan]) -> tuple[ModelConfig, tuple[int, ...]]:
    """(the config of the model that `plan` keeps, the original indices of its blocks). layer_heads and value_dims
    are () where they keep everything; scan_layers stays on only if the slim model is uniform."""
    check_plan(cfg, plan)
    kept = tuple(i for i, unit in enumerate(plan) if unit.keep_block)
    heads = tuple(len(plan[i].heads) for i in kept)
    widths = tuple(tuple(len(d) for d in plan[i].dims) for i in kept)
    slim = cfg.replace(
        depth=len(kept),
        layer_heads=() if set(heads) == {cfg.num_heads} else heads,
        value_dims=() if all(set(w) <= {cfg.attn_head_dim} for w in widths) else widths,
        mlp_hidden=tuple(len(plan[i].neurons) for i in kept),
        scan_layers=False,
    )
    return slim.replace(scan_layers=cfg.scan_layers and slim.uniform), kept


def slice_units(cfg: ModelConfig, params: Params, plan: Sequence[UnitPlan]) -> tuple[ModelConfig, Params, tuple]:
    """Cut the units `plan` keeps out of (cfg, params): (slim config, slim params, original indices of the kept
    blocks). Pure surgery (numpy copies, nothing recomputed): kept units keep their order and their bits, so the
    slim model computes the masked model's function at the matching hard masks (module docstring). Scanned or
    per-layer params; the result is scanned only if cfg.scan_layers and the slim model is uniform."""
    slim, kept = slim_config(cfg, plan)
    layers = unstack_blocks(params) if is_scanned(params) else params
    out = {k: v for k, v in layers.items() if not k.startswith("blocks_")}
    for new, old in enumerate(kept):
        out[f"blocks_{new}"] = _slice_block(cfg, old, layers[f"blocks_{old}"], plan[old])
    return slim, stack_blocks(out) if slim.scan_layers else out, kept


# ---- the masked model -------------------------------------------------------------------------------------------


def _layer_mask(mask: Any, layer: int | None) -> jnp.ndarray | None:
    """Layer `layer`'s entry of a per-layer mask (a stacked array or a sequence of arrays); None: the stack."""
    if mask is None:
        return None
    return jnp.asarray(mask) if layer is None else jnp.asarray(mask[layer])


def _check_shape(name: str, value: jnp.ndarray | None, want: tuple[int, ...], layer: int | None) -> None:
    if value is not None and tuple(value.shape) != want:
        where = "stacked over layers" if layer is None else f"layer {layer}"
        raise UserError(f"{name} ({where}) must have shape {want}, got {tuple(value.shape)}")


def _value_rows(cfg: ModelConfig, layer: int) -> np.ndarray:
    """For each value column of `layer`, its position h * attn_head_dim + j in an (H, attn_head_dim) mask."""
    d = cfg.attn_head_dim
    return np.asarray([h * d + j for h, w in enumerate(cfg.vdims(layer)) for j in range(w)], np.int64)


def _row_scale(cfg: ModelConfig, layer: int, mh: jnp.ndarray | None, md: jnp.ndarray | None) -> jnp.ndarray | None:
    """Scale of each proj input row, mh[h] * md[h, j] per value column; a leading layer axis if the masks have one."""
    if mh is None and md is None:
        return None
    h, d = cfg.heads(layer), cfg.attn_head_dim
    lead = (mh if mh is not None else md).shape[: -1 if mh is not None else -2]
    mh = jnp.ones((*lead, h)) if mh is None else mh
    md = jnp.ones((*lead, h, d)) if md is None else md
    return (mh[..., :, None] * md).reshape(*lead, h * d)[..., _value_rows(cfg, layer)]


def masked_params(
    cfg: ModelConfig,
    params: Params,
    head_mask: Any = None,
    dim_mask: Any = None,
    neuron_mask: Any = None,
    attn_gate: Any = None,
    mlp_gate: Any = None,
) -> Params:
    """The masked model's params: the rows of attn/proj/kernel scaled by head_mask[l][h] * dim_mask[l][h, j] (row of
    head h, value dim j) and the rows of mlp/fc2/kernel by neuron_mask[l][i]; attn_gate[l] / mlp_gate[l] scale a
    whole branch (0: the branch removed, see the module docstring). jnp ops only, so differentiable in the masks.

    Per layer l the masks have shapes (heads(l),), (heads(l), attn_head_dim) (a narrower head uses its first
    vdims(l)[h] entries) and (mlp_hidden[l],); pass them stacked ((depth, ...) arrays) or as sequences of per-layer
    arrays; scanned params need stacked masks. None leaves that factor out.
    """
    scanned = is_scanned(params)
    flat = dict(flatten(params))
    layers = [None] if scanned else range(cfg.depth)
    for layer in layers:
        index = 0 if layer is None else layer
        lead = (cfg.depth,) if layer is None else ()
        prefix = "blocks/block/" if layer is None else f"blocks_{layer}/"
        mh, md = _layer_mask(head_mask, layer), _layer_mask(dim_mask, layer)
        mn, ga, gm = _layer_mask(neuron_mask, layer), _layer_mask(attn_gate, layer), _layer_mask(mlp_gate, layer)
        heads, hidden = cfg.heads(index), cfg.mlp_hidden[index]
        _check_shape("head_mask", mh, (*lead, heads), layer)
        _check_shape("dim_mask", md, (*lead, heads, cfg.attn_head_dim), layer)
        _check_shape("neuron_mask", mn, (*lead, hidden), layer)
        _check_shape("attn_gate", ga, lead, layer)
        _check_shape("mlp_gate", gm, lead, layer)
        if heads:
            rows = _row_scale(cfg, index, mh, md)
            _scale(flat, prefix + "attn/proj/kernel", rows)
            _gate_branch(cfg, flat, prefix, ga, "attn/proj", "norm1")
        if hidden:
            _scale(flat, prefix + "mlp/fc2/kernel", mn)
            _gate_branch(cfg, flat, prefix, gm, "mlp/fc2", "norm2")
    return unflatten(flat)


def _scale(flat: dict[str, Any], path: str, factor: jnp.ndarray | None) -> None:
    """flat[path] *= factor, the factor's axes leading (rows (..., V) of a (..., V, D) kernel; a gate (...))."""
    if factor is None or path not in flat:
        return
    value = jnp.asarray(flat[path])
    factor = factor.astype(value.dtype)
    flat[path] = value * factor.reshape(*factor.shape, *(1,) * (value.ndim - factor.ndim))


def _gate_branch(cfg: ModelConfig, flat: dict[str, Any], prefix: str, gate: Any, linear: str, post: str) -> None:
    """Scale a branch's output by gate: its last linear (pre-norm blocks) or the norm after it (post-norm)."""
    if gate is None:
        return
    names = (f"{post}/scale", f"{post}/bias") if cfg.post_norm else (f"{linear}/kernel", f"{linear}/bias")
    for name in names:
        _scale(flat, prefix + name, gate)


def branch_gates(cfg: ModelConfig, head_mask: Any, dim_mask: Any, neuron_mask: Any) -> tuple[np.ndarray, np.ndarray]:
    """(attn_gate, mlp_gate), (depth,) each: 0 where hard masks keep nothing of a branch (no head with a kept value
    dim; no neuron), else 1 -- the branch gates under which the masked model equals the slim model."""
    plan = plan_from_masks(cfg, head_mask, dim_mask, neuron_mask)
    attn = np.asarray([float(bool(u.heads)) for u in plan])
    mlp = np.asarray([float(bool(u.neurons)) for u in plan])
    return attn, mlp


def plan_from_masks(
    cfg: ModelConfig,
    head_mask: Any = None,
    dim_mask: Any = None,
    neuron_mask: Any = None,
    gates: Any = None,
    attn_gate: Any = None,
    mlp_gate: Any = None,
) -> Plan:
    """The plan of hard masks and gates (a unit is kept where its mask is nonzero; None keeps everything): a head is
    kept if its head mask and at least one of its value-dim masks are nonzero, a branch whose gate is 0 keeps nothing,
    a block is kept if its gate is nonzero and it keeps a head or a neuron (else it is the identity)."""

    def values(mask: Any, layer: int, shape: tuple[int, ...]) -> np.ndarray:
        return np.ones(shape) if mask is None else np.asarray(mask[layer])

    plan = []
    for i in range(cfg.depth):
        d, vdims = cfg.attn_head_dim, cfg.vdims(i)
        mh, md = values(head_mask, i, (cfg.heads(i),)), values(dim_mask, i, (cfg.heads(i), d))
        mn = values(neuron_mask, i, (cfg.mlp_hidden[i],))
        heads, dims = [], []
        if attn_gate is None or np.asarray(attn_gate[i]) != 0:
            for h, w in enumerate(vdims):
                kept = tuple(int(j) for j in np.flatnonzero(md[h, :w]))
                if mh[h] != 0 and kept:
                    heads.append(h)
                    dims.append(kept)
        on = mlp_gate is None or np.asarray(mlp_gate[i]) != 0
        neurons = tuple(int(j) for j in np.flatnonzero(mn)) if on else ()
        keep = (gates is None or np.asarray(gates[i]) != 0) and bool(heads or neurons)
        plan.append(UnitPlan(keep, tuple(heads), tuple(dims), neurons))
    return tuple(plan)


@contextlib.contextmanager
def masked_norm_statistics(
    cfg: ModelConfig, head_mask: Any = None, dim_mask: Any = None, neuron_mask: Any = None
) -> Iterator[None]:
    """Within this context, `forward` of cfg's (unscanned) masked model takes the statistics of its norms inside a
    pruned width over the kept units: q_norm / k_norm (qk_norm="full") weighted by the head mask (0 for a head whose
    value-dim masks are all 0), the attention output norm (attn_norm) by head_mask * dim_mask, the hidden norm
    (mlp_norm) by the neuron mask. At hard masks that is exactly what the slim model's norms see; soft masks give
    weighted statistics. Masks as in masked_params (per layer); with all masks None the norms are plain."""
    if cfg.scan_layers:
        raise UserError("masked_norm_statistics needs an unscanned model (scan_layers=False)")
    d = cfg.attn_head_dim

    def weights(layer: int, site: tuple[str, ...]) -> jnp.ndarray | None:
        mh, md = _layer_mask(head_mask, layer), _layer_mask(dim_mask, layer)
        if site in (("attn", "q_norm"), ("attn", "k_norm")):
            if mh is None and md is None:
                return None
            # a head counts if its head mask and one of its value dims are on (plan_from_masks keeps the same heads)
            head = jnp.ones(cfg.heads(layer)) if mh is None else mh
            if md is not None:
                valid = np.arange(d)[None, :] < np.asarray(cfg.vdims(layer))[:, None]
                head = head * (jnp.abs(jnp.where(valid, md, 0)).sum(-1) > 0)
            return jnp.repeat(head, d)
        if site == ("attn", "norm"):
            return _row_scale(cfg, layer, mh, md)
        if site == ("mlp", "norm"):
            return _layer_mask(neuron_mask, layer)
        return None

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            return next_fun(*args, **kwargs)
        path = tuple(module.path)
        if len(path) < 3 or not path[0].startswith("blocks_"):
            return next_fun(*args, **kwargs)
        w = weights(int(path[0][len("blocks_") :]), path[1:])
        return next_fun(*args, **kwargs) if w is None else _weighted_norm(module, args[0], w)

    with nn.intercept_methods(interceptor):
        yield


def _weighted_norm(module: nn.Module, x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
    """module's LayerNorm / RMSNorm of x over its last axis with statistics weighted by w (sum-normalized)."""
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    x32, w = x.astype(dtype), w.astype(dtype)
    total = w.sum()
    total = jnp.where(total > 0, total, 1)  # nothing kept: the branch is gated off, keep it finite
    scale = module.get_variable("params", "scale").astype(dtype)
    if isinstance(module, nn.RMSNorm):
        y = x32 * jax.lax.rsqrt((w * x32 * x32).sum(-1, keepdims=True) / total + module.epsilon) * scale
    else:
        mean = (w * x32).sum(-1, keepdims=True) / total
        var = (w * jnp.square(x32 - mean)).sum(-1, keepdims=True) / total
        y = (x32 - mean) * (jax.lax.rsqrt(var + module.epsilon) * scale)
        y = y + module.get_variable("params", "bias").astype(dtype)
    return y.astype(module.dtype or x.dtype)


# ---- PyTorch export: padding to one head width and both branches ------------------------------------------------


def needs_padding(cfg: ModelConfig) -> bool:
    """cfg has narrowed value widths or absent branches, which a timm Block cannot hold as they are."""
    d = cfg.attn_head_dim
    return any(
        cfg.heads(i) == 0 or cfg.mlp_hidden[i] == 0 or any(w < d for w in cfg.vdims(i)) for i in range(cfg.depth)
    )


def padded_config(cfg: ModelConfig) -> tuple[ModelConfig, Plan]:
    """(the config of cfg's PyTorch export: values at attn_head_dim, 1 head / 1 neuron for an absent branch; the
    plan that slices that model back to cfg)."""
    heads = tuple(max(cfg.heads(i), 1) for i in range(cfg.depth))
    padded = cfg.replace(
        layer_heads=() if set(heads) <= {cfg.num_heads} else heads,
        value_dims=(),
        mlp_hidden=tuple(max(h, 1) for h in cfg.mlp_hidden),
    )
    return padded, full_plan(cfg)


def pad_units(cfg: ModelConfig, params: Params) -> tuple[ModelConfig, Params, Plan]:
    """(padded config, padded params, plan) for export: `slice_units(padded, padded_params, plan)` gives back
    (cfg, params) exactly. Narrow values are padded with exact zeros; an absent branch becomes an all-zero 1-head
    attention or width-1 MLP (with all-zero norm and layer scale), so the padded model computes cfg's function.

    A narrowed head under attn_norm cannot be padded exactly (the norm's statistics would include the zeros):
    ValueError."""
    from dgmr_jax.models.vit import param_shapes

    padded, plan = padded_config(cfg)
    if cfg.attn_norm and any(w < cfg.attn_head_dim for i in range(cfg.depth) for w in cfg.vdims(i)):
        raise UserError(
            "value widths below attn_head_dim cannot be exported with attn_norm=True: the attention-output norm "
            "would take its statistics over the zero padding"
        )
    layers = unstack_blocks(params) if is_scanned(params) else params
    dtype = np.asarray(layers["patch_embed"]["kernel"]).dtype
    shapes = param_shapes(padded.replace(scan_layers=False))
    out = {k: v for k, v in layers.items() if not k.startswith("blocks_")}
    for i in range(cfg.depth):
        name, block = f"blocks_{i}", layers[f"blocks_{i}"]
        new = {k: v for k, v in block.items() if k not in _ATTN_PARTS + _MLP_PARTS}
        zeros = {k: jax.tree_util.tree_map(lambda s: np.zeros(s.shape, dtype), v) for k, v in shapes[name].items()}
        if cfg.heads(i):
            new.update({k: block[k] for k in ("norm1", "ls1") if k in block})
            new["attn"] = _pad_attn(cfg, i, block["attn"])
        else:
            new.update({k: zeros[k] for k in _ATTN_PARTS if k in zeros})
        if cfg.mlp_hidden[i]:
            new.update({k: block[k] for k in _MLP_PARTS if k in block})
        else:
            new.update({k: zeros[k] for k in _MLP_PARTS if k in zeros})
        out[name] = new
    return padded, stack_blocks(out) if padded.scan_layers else out, plan


def _pad_attn(cfg: ModelConfig, layer: int, attn: Params) -> Params:
    """A layer's attention params with each head's values widened to attn_head_dim by zero columns / rows."""
    vdims, d = cfg.vdims(layer), cfg.attn_head_dim
    if all(w == d for w in vdims):
        return attn
    qk, rows = cfg.heads(layer) * d, _value_rows(cfg, layer)

    def widen(a: Any, axis: int, offset: int) -> np.ndarray:
        a = np.asarray(a)
        shape = list(a.shape)
        shape[axis] = offset + qk
        out = np.zeros(shape, a.dtype)
        index = [slice(None)] * a.ndim
        index[axis] = slice(0, offset)
        src = [slice(None)] * a.ndim
        src[axis] = slice(0, offset)
        out[tuple(index)] = a[tuple(src)]
        index[axis] = offset + rows
        src[axis] = slice(offset, None)
        out[tuple(index)] = a[tuple(src)]
        return out

    out = dict(attn)
    out["qkv"] = {k: widen(a, -1, 2 * qk) for k, a in attn["qkv"].items()}
    if "v_bias" in attn:
        out["v_bias"] = widen(attn["v_bias"], 0, 0)
    out["proj"] = {"kernel": widen(attn["proj"]["kernel"], 0, 0), "bias": attn["proj"]["bias"]}
    return out
