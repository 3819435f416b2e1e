"""Which hidden neurons of an MLP survive pruning (docs/method.md, Neuron selection).

`kernel` is always a Flax fc1 kernel of shape (D, H): column i is the weight vector of hidden
neuron i. Methods:

- ``diversity``: greedy Gram-Schmidt, i.e. QR with column pivoting; the pivot order is the pick
  order. Run in rounds of at most D picks, each on the original vectors of the neurons not yet
  picked (the official k-round semantics), so a target width above D is reachable.
- ``l2``: largest column norms.
- ``random``: seeded sample without replacement.
- ``taylor``: largest precomputed importance scores.

Two exact routes compute the greedy picks, both giving scipy's float64 pivot order exactly on
random matrices:

- ``gram_schmidt`` (the default everywhere): a jitted blocked Gram-Schmidt in plain jnp that
  runs on CPU, GPU and TPU. On a 2-core CPU it is 1.3x (ViT-g fc1) to 2x (EVA-E fc1) faster than
  geqp3 in float32, and on a random ViT-g-shaped kernel in float32 it kept the float64 pick order
  through all 1408 picks, where float32 geqp3 drifts after about 440 (near-ties; docs/method.md).
- ``lapack``: LAPACK's pivoted QR (geqp3) through ``jax.lax.linalg.qr``; the reference route.
  CPU and GPU only (TPU has no pivoted QR).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dgmr_jax.core.errors import UserError

METHODS = ("diversity", "l2", "random", "taylor")
BACKENDS = ("auto", "lapack", "gram_schmidt")

# Gram-Schmidt blocking: at most this many picks per block, and this many candidate neurons with
# explicit residuals. Tuned on a 2-core CPU at the ViT-g and EVA-E fc1 shapes, where a block
# averages about 15 picks; larger values cost more per pick than they save in blocks.
_BLOCK = 32
_CANDIDATES = 128

_matmul = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)


def select_neurons(
    kernel: Any,
    k: int,
    method: str = "diversity",
    *,
    seed: int = 0,
    scores: Any = None,
    backend: str = "auto",
) -> np.ndarray:
    """Indices of the `k` hidden neurons to keep, in selection order, without duplicates.

    Args:
      kernel: (D, H) fc1 kernel, columns are neurons; numpy or jax array of any float dtype.
      k: number of neurons to keep, 1 <= k <= H (k may exceed D for ``diversity``).
      method: one of ``METHODS``.
      seed: seed of ``random``.
      scores: (H,) per-neuron importance, required by ``taylor``.
      backend: ``diversity`` route: ``"gram_schmidt"``, ``"lapack"`` or ``"auto"`` (= gram_schmidt).

    Returns:
      int64 array of shape (k,).
    """
    if method not in METHODS:
        raise UserError(f"unknown selection method {method!r}; valid methods: {', '.join(METHODS)}")
    _check_backend(backend)
    shape = _check_kernel(kernel)
    _check_k(k, shape[1])
    if method == "diversity":
        return _diversity(kernel, k, backend)[0]
    if method == "l2":
        return _top_k(np.linalg.norm(_host_float(kernel), axis=0), k)
    if method == "random":
        return np.random.default_rng(seed).choice(shape[1], size=k, replace=False).astype(np.int64)
    if scores is None:
        raise UserError("method 'taylor' needs per-neuron importance scores (shape (H,)); got scores=None")
    scores = np.asarray(scores)
    if scores.shape != (shape[1],):
        raise UserError(f"taylor scores must have shape (H,) = ({shape[1]},), got {scores.shape}")
    if not np.all(np.isfinite(scores)):
        raise UserError("taylor scores contain NaN or Inf")
    return _top_k(scores, k)


def diversity_select(kernel: Any, k: int, *, backend: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """k-round greedy Gram-Schmidt selection and the residual norm of each pick when it was picked.

    Round r runs a fresh greedy pass over the original columns of the not-yet-picked neurons and
    picks min(D, remaining, still needed) of them. The residual norms (the "diversity curve") fall
    within a round and jump back up at the start of the next.

    Returns:
      (indices (k,) int64, residual norms (k,) float32 or float64).
    """
    _check_backend(backend)
    _check_k(k, _check_kernel(kernel)[1])
    return _diversity(kernel, k, backend)


def diversity_curve(kernel: Any, k: int, *, backend: str = "auto") -> np.ndarray:
    """Residual L2 norm of each of the `k` diversity picks at the moment it was picked."""
    return diversity_select(kernel, k, backend=backend)[1]


def _diversity(kernel: Any, k: int, backend: str) -> tuple[np.ndarray, np.ndarray]:
    """diversity_select on arguments already checked."""
    d, h = kernel.shape
    if backend == "auto":
        backend = "gram_schmidt"  # fastest on CPU too, see the module docstring
    dtype = jnp.float64 if np.dtype(kernel.dtype) == np.float64 else jnp.float32
    with jax.enable_x64(dtype == jnp.float64):
        cols = jnp.asarray(kernel, dtype)
        picked = np.zeros(h, bool)
        picks, norms, done = [], [], 0
        while done < k:
            remaining = np.flatnonzero(~picked)
            n = min(d, remaining.size, k - done)
            sub = cols if done == 0 else jnp.take(cols, jnp.asarray(remaining), axis=1)
            local, res = _greedy(sub, n, backend)
            picks.append(remaining[local])
            norms.append(res)
            picked[picks[-1]] = True
            done += n
    return np.concatenate(picks).astype(np.int64), np.concatenate(norms)


def _greedy(cols: jax.Array, n: int, backend: str) -> tuple[np.ndarray, np.ndarray]:
    """First `n` greedy picks (one round) on the columns of `cols` and their residual norms."""
    if backend == "lapack":
        picks, norms = _greedy_lapack(cols, n)
    else:
        block = min(_BLOCK, n)
        picks, norms = _greedy_gram_schmidt(cols, n, block, min(_CANDIDATES, cols.shape[1]))
    return np.asarray(picks), np.asarray(norms)


@functools.partial(jax.jit, static_argnames="n")
def _greedy_lapack(cols: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """Pivoted QR (LAPACK geqp3); Q is never formed because it is unused under jit."""
    _, r, p = jax.lax.linalg.qr(cols, pivoting=True, full_matrices=False)
    return p[:n], jnp.abs(jnp.diagonal(r)[:n])


@functools.partial(jax.jit, static_argnames=("n", "block", "cands"))
def _greedy_gram_schmidt(cols: jax.Array, n: int, block: int, cands: int) -> tuple[jax.Array, jax.Array]:
    """Blocked greedy Gram-Schmidt with exact pivoting.

    Writing a full residual matrix per pick (or per block) is what makes the plain loop slow, so
    the original rows are only ever read. Explicit residuals are kept for `cands` candidate
    neurons; every neuron's squared residual norm is downdated once per block with one matmul
    against the block's new directions (like LAPACK's geqp3 downdates its column norms). Within a
    block a pick is exact while the best candidate is at least the largest estimate outside the
    candidates (`bound`), since residuals never grow; otherwise the block ends. Between blocks
    the `block` best outsiders are orthogonalized exactly (CGS2 against all directions so far)
    and replace the weakest candidates they beat; those they do not beat get their exact norm as
    estimate, so a block without picks still makes progress.
    """
    d, h = cols.shape
    wt = cols.T  # neurons as rows: XLA's CPU matmuls are several times faster in this layout
    inflow = min(block, h - cands)  # outsiders examined per block; 0 when every neuron is a candidate
    norm2 = jnp.sum(wt * wt, axis=1)
    _, first = jax.lax.top_k(norm2, cands)
    state = dict(
        est2=norm2,  # squared residual norms: downdated, exact for neurons just examined
        slot=first,  # the neuron held by each candidate slot
        rc=wt[first],  # its residual
        in_c=jnp.zeros(h, bool).at[first].set(True),
        qt=jnp.zeros((n + block, d), cols.dtype),  # picked directions; padded for block slices
        picks=jnp.zeros(n, jnp.int32),
        norms=jnp.zeros(n, cols.dtype),
        picked=jnp.zeros(h, bool),
        count=jnp.int32(0),
    )
    run_block = functools.partial(_gs_block, wt=wt, n=n, block=block, inflow=inflow)
    out = jax.lax.while_loop(lambda s: s["count"] < n, run_block, state)
    return out["picks"], out["norms"]


def _gs_refill(s: dict, wt: jax.Array, n: int, block: int, inflow: int) -> dict:
    """Swap the best outsiders (by estimate) for the weakest candidates they beat."""
    out2 = jnp.where(s["picked"] | s["in_c"], -jnp.inf, s["est2"])
    top, new = jax.lax.top_k(out2, inflow)
    real = top > -jnp.inf  # fewer than `inflow` outsiders may be left
    sizes = [-(-(n + block) * q // 4) for q in (1, 2, 3, 4)]  # only `count` rows of qt are set
    x = _bucketed(s["count"], sizes, lambda r: lambda x: _cgs2(x, s["qt"][:r]), wt[new])
    x2 = jnp.sum(x * x, axis=1)
    c2 = jnp.where(s["picked"][s["slot"]], -jnp.inf, jnp.sum(s["rc"] * s["rc"], axis=1))
    weak2, weak = jax.lax.top_k(-c2, inflow)  # weakest slots first, paired with best outsiders
    swap = real & (x2 > -weak2)
    gone = s["slot"][weak]
    est2 = s["est2"].at[new].set(jnp.where(real, x2, s["est2"][new]))
    est2 = est2.at[gone].set(jnp.where(swap, -weak2, est2[gone]))
    in_c = s["in_c"].at[gone].set(~swap)
    return dict(
        s,
        est2=est2,
        in_c=in_c.at[new].set(in_c[new] | swap),
        slot=s["slot"].at[weak].set(jnp.where(swap, new, gone)),
        rc=s["rc"].at[weak].set(jnp.where(swap[:, None], x, s["rc"][weak])),
    )


def _gs_best(c2: jax.Array, slot: jax.Array, h: int) -> tuple[jax.Array, jax.Array]:
    """The best candidate's squared residual and slot; ties go to the lowest neuron index."""
    best = jnp.max(c2)
    return best, jnp.argmin(jnp.where(c2 == best, slot, h))


def _gs_exact(t: dict, i: jax.Array, n: int, block: int, bound: jax.Array) -> jax.Array:
    """Whether the block's next pick is exact and wanted."""
    # Residuals only shrink, so no outsider can beat a candidate at or above `bound`. An
    # exact tie with an outsider goes to the candidate: `>=` guarantees progress.
    return (t["j"] < block) & (i + t["j"] < n) & (t["best"] >= bound) & (t["best"] > -jnp.inf)


def _gs_pick(t: dict, i: jax.Array, slot: jax.Array, block: int, h: int) -> dict:
    """Pick the best candidate: its unit direction, and every candidate's residual downdated by it."""
    pos, nrm, at = t["pos"], jnp.sqrt(jnp.maximum(t["best"], 0)), i + t["j"]
    u = _unit(t["rc"][pos])
    ub = jax.lax.dynamic_slice_in_dim(t["qt"], i, block)  # this block's picks so far
    u = _unit(u - _matmul(_matmul(ub, u), ub))  # re-orthogonalize against them
    row = _matmul(t["rc"], u)
    c2 = (t["c2"] - row * row).at[pos].set(-jnp.inf)
    best, nxt = _gs_best(c2, slot, h)
    return dict(
        rc=t["rc"] - row[:, None] * u[None, :],
        c2=c2,
        qt=t["qt"].at[at].set(u),
        picks=t["picks"].at[at].set(slot[pos]),
        norms=t["norms"].at[at].set(nrm),
        picked=t["picked"].at[slot[pos]].set(True),
        j=t["j"] + 1,
        best=best,
        pos=nxt,
    )


def _gs_block(s: dict, wt: jax.Array, n: int, block: int, inflow: int) -> dict:
    """One block: refill the candidates, pick exactly while a pick is provably the best, downdate the estimates."""
    i, h = s["count"], wt.shape[0]
    if inflow:
        s = _gs_refill(s, wt, n, block, inflow)
        bound = jnp.max(jnp.where(s["picked"] | s["in_c"], -jnp.inf, s["est2"]))
    else:
        bound = -jnp.inf
    slot = s["slot"]
    c2 = jnp.where(s["picked"][slot], -jnp.inf, jnp.sum(s["rc"] * s["rc"], axis=1))
    best, pos = _gs_best(c2, slot, h)
    t = dict(rc=s["rc"], c2=c2, qt=s["qt"], picks=s["picks"], norms=s["norms"], picked=s["picked"])
    exact = functools.partial(_gs_exact, i=i, n=n, block=block, bound=bound)
    pick = functools.partial(_gs_pick, i=i, slot=slot, block=block, h=h)
    t = jax.lax.while_loop(exact, pick, dict(t, j=jnp.int32(0), best=best, pos=pos))

    def downdate(r):
        p = _matmul(wt, jax.lax.dynamic_slice_in_dim(t["qt"], i, r).T)
        return s["est2"] - jnp.sum(p * p, axis=1)

    sizes = sorted({max(block // 4, 1), max(block // 2, 1), block})  # the matmul costs ~ picks made
    est2 = _bucketed(t["j"], sizes, lambda r: lambda _: downdate(r), None)
    return dict(s, est2=est2, count=i + t["j"], **{k: t[k] for k in ("rc", "qt", "picks", "norms", "picked")})


def _cgs2(x: jax.Array, q: jax.Array) -> jax.Array:
    """Rows of x with their components along the orthonormal rows of q removed, twice for accuracy."""
    x = x - _matmul(_matmul(x, q.T), q)
    return x - _matmul(_matmul(x, q.T), q)


def _bucketed(count: jax.Array, sizes: list[int], make: Any, arg: Any) -> jax.Array:
    """make(size)(arg) for the smallest static size >= count, so work scales with a traced count."""
    return jax.lax.switch(jnp.sum(count > jnp.array(sizes[:-1])), [make(r) for r in sizes], arg)


def _unit(v: jax.Array) -> jax.Array:
    """v / ||v||, and 0 for v = 0: a zero residual (dependent neuron) projects nothing out."""
    norm = jnp.linalg.norm(v)
    return v / jnp.where(norm > 0, norm, 1)


def _top_k(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, descending; ties go to the lower index."""
    return np.argsort(-np.asarray(values, np.float64), kind="stable")[:k].astype(np.int64)


def _host_float(kernel: Any) -> np.ndarray:
    """The kernel as a float32 (or float64, if it is) numpy array."""
    return np.asarray(kernel, np.float64 if np.dtype(kernel.dtype) == np.float64 else np.float32)


def _check_kernel(kernel: Any) -> tuple[int, int]:
    """Shape (D, H) of a 2-D finite float kernel; ValueError otherwise."""
    shape = getattr(kernel, "shape", None)
    if shape is None or len(shape) != 2:
        raise UserError(f"kernel must be a 2-D (D, H) fc1 kernel with neurons as columns, got shape {shape}")
    if not jnp.issubdtype(kernel.dtype, jnp.floating):
        raise UserError(f"kernel must have a float dtype, got {kernel.dtype}")
    if min(shape) == 0:
        raise UserError(f"kernel is empty: shape {tuple(shape)}")
    finite = jnp.isfinite(kernel).all() if isinstance(kernel, jax.Array) else np.isfinite(kernel).all()
    if not finite:
        raise UserError("kernel contains NaN or Inf; neuron selection needs finite weights")
    return int(shape[0]), int(shape[1])


def _check_k(k: int, h: int) -> None:
    """1 <= k <= H, integer; ValueError otherwise."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise UserError(f"k must be an integer number of neurons to keep, got {k!r}")
    if not 1 <= k <= h:
        raise UserError(f"k must satisfy 1 <= k <= H = {h} (the fc1 width), got k = {k}")


def _check_backend(backend: str) -> None:
    """A known diversity route; ValueError otherwise."""
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
