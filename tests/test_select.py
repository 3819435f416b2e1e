"""Neuron selection (docs/method.md): exact greedy pivots, k-round semantics, baselines, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from dgmr_jax.prune import select
from dgmr_jax.prune.select import _greedy_gram_schmidt, diversity_curve, diversity_select, select_neurons

BACKENDS = ("lapack", "gram_schmidt")


def official_round(rows: np.ndarray) -> list[int]:
    """One greedy Gram-Schmidt round written as the official loop, on neuron vectors as rows.

    Picked rows are masked so that a round over fewer vectors than D cannot repeat a pick.
    """
    r = rows.copy()
    picks: list[int] = []
    for _ in range(min(rows.shape)):
        norms = np.linalg.norm(r, axis=1)
        norms[picks] = -np.inf
        p = int(np.argmax(norms))
        picks.append(p)
        u = r[p] / norms[p]
        r = r - np.outer(r @ u, u)
    return picks


def official_k_round(kernel: np.ndarray, k: int) -> np.ndarray:
    """Rounds on the original vectors of the not-yet-picked neurons; keep the first k picks."""
    chosen: list[int] = []
    while len(chosen) < k:
        remaining = np.setdiff1d(np.arange(kernel.shape[1]), chosen)
        chosen += remaining[official_round(kernel[:, remaining].T)].tolist()
    return np.array(chosen[:k])


def gaussian(d: int, h: int, seed: int = 0, dtype=np.float64) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((d, h)).astype(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(16, 64), (32, 32), (48, 40), (64, 300)])
def test_diversity_equals_scipy_pivoted_qr(shape, backend):
    w = gaussian(*shape, seed=sum(shape))
    _, r, pivots = scipy.linalg.qr(w, pivoting=True, mode="economic")
    n = min(shape)
    idx, norms = diversity_select(w, n, backend=backend)
    np.testing.assert_array_equal(idx, pivots[:n])
    assert norms.dtype == np.float64
    np.testing.assert_allclose(norms, np.abs(np.diag(r)), rtol=1e-10)


@pytest.mark.parametrize("block, cands", [(8, 16), (4, 5), (16, 200)])
def test_gram_schmidt_blocks_that_end_early_stay_exact(block, cands):
    """Few candidates make most blocks stop before `block` picks, exercising the bound check."""
    w = gaussian(40, 200, seed=6)
    _, r, pivots = scipy.linalg.qr(w, pivoting=True, mode="economic")
    with jax.enable_x64(True):
        picks, norms = _greedy_gram_schmidt(jnp.asarray(w), 40, block, cands)
    np.testing.assert_array_equal(picks, pivots[:40])
    np.testing.assert_allclose(norms, np.abs(np.diag(r)), rtol=1e-10)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gram_schmidt_progresses_through_exact_ties(dtype):
    """Tenfold repeated and zero neurons tie exactly; tiny blocks then often start with no exact pick."""
    base = gaussian(16, 8, seed=7)
    w = np.concatenate([np.repeat(base, 10, axis=1), np.zeros((16, 80))], axis=1).astype(dtype)
    with jax.enable_x64(dtype == np.float64):
        picks, norms = _greedy_gram_schmidt(jnp.asarray(w), 16, 2, 2)
    assert len(set(np.asarray(picks).tolist())) == 16
    # Which copy of a repeated neuron is taken does not change the residual norms that follow.
    r = np.linalg.qr(w[:, official_round(w.T.astype(np.float64))].astype(np.float64))[1]
    np.testing.assert_allclose(norms, np.abs(np.diag(r)), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ratio", [0.5, 1, 2, 3])
def test_k_rounds_equal_official_loop(ratio, backend):
    d = 24
    w = gaussian(d, 4 * d, seed=1)
    k = int(ratio * d)
    expected = official_k_round(w, k)
    np.testing.assert_array_equal(select_neurons(w, k, backend=backend), expected)


@pytest.mark.parametrize("ratio", [0.5, pytest.param(3, marks=pytest.mark.slow)])
def test_k_rounds_with_small_gram_schmidt_blocks(ratio, monkeypatch):
    """The same rounds when candidates are far fewer than neurons, so blocks refill and end early."""
    monkeypatch.setattr(select, "_BLOCK", 4)
    monkeypatch.setattr(select, "_CANDIDATES", 8)
    w = gaussian(24, 96, seed=1)
    k = int(ratio * 24)
    np.testing.assert_array_equal(select_neurons(w, k, backend="gram_schmidt"), official_k_round(w, k))


@pytest.mark.parametrize("backend", BACKENDS)
def test_short_last_round_has_no_duplicates(backend):
    d, h = 24, 60  # rounds of 24, 24, then 12 remaining vectors
    w = gaussian(d, h, seed=2)
    idx = select_neurons(w, h, backend=backend)
    np.testing.assert_array_equal(np.sort(idx), np.arange(h))
    np.testing.assert_array_equal(idx, official_k_round(w, h))
    curve = diversity_curve(w, h, backend=backend)
    assert curve[d] > curve[d - 1] and curve[2 * d] > curve[2 * d - 1]  # each round starts afresh


@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_deficient_kernel_has_no_duplicates(backend):
    w = gaussian(8, 16, seed=3)
    w = np.concatenate([w, w[:, :8], np.zeros((8, 8))], axis=1)  # repeated and zero columns
    idx = select_neurons(w, 32, backend=backend)
    np.testing.assert_array_equal(np.sort(idx), np.arange(32))


def test_backends_agree_in_float32():
    w = gaussian(64, 256, seed=4, dtype=np.float32)
    lapack, lapack_norms = diversity_select(w, 64, backend="lapack")
    gram, gram_norms = diversity_select(jnp.asarray(w), 64, backend="gram_schmidt")
    np.testing.assert_array_equal(lapack, gram)
    assert gram_norms.dtype == np.float32
    np.testing.assert_allclose(lapack_norms, gram_norms, rtol=1e-4)


def test_low_precision_kernel_is_selected_in_float32():
    w = gaussian(16, 48, seed=5, dtype=np.float32)
    as_f32 = np.asarray(jnp.asarray(w, jnp.bfloat16), np.float32)
    idx = select_neurons(jnp.asarray(w, jnp.bfloat16), 16)
    np.testing.assert_array_equal(idx, select_neurons(as_f32, 16, backend="lapack"))


def test_l2_picks_largest_norms_ties_to_lower_index():
    w = np.zeros((3, 6), np.float32)
    w[0] = [1.0, 3.0, 2.0, 0.0, 0.5, 0.0]
    w[1] = [0.0, 0.0, 0.0, 3.0, 0.0, 0.0]  # column 3 ties column 1 in norm
    np.testing.assert_array_equal(select_neurons(w, 4, method="l2"), [1, 3, 2, 0])


def test_random_is_seeded_and_without_replacement():
    w = gaussian(4, 50)
    a = select_neurons(w, 40, method="random", seed=7)
    np.testing.assert_array_equal(a, select_neurons(w, 40, method="random", seed=7))
    assert len(set(a.tolist())) == 40 and a.min() >= 0 and a.max() < 50
    assert not np.array_equal(a, select_neurons(w, 40, method="random", seed=8))
    np.testing.assert_array_equal(np.sort(select_neurons(w, 50, method="random")), np.arange(50))


def test_taylor_takes_top_scores():
    scores = np.array([0.1, 0.9, 0.5, 0.9, 0.0])
    np.testing.assert_array_equal(select_neurons(gaussian(3, 5), 3, method="taylor", scores=scores), [1, 3, 2])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k=0), r"1 <= k <= H = 10"),
        (dict(k=11), r"1 <= k <= H = 10"),
        (dict(k=2.5), r"k must be an integer"),
        (dict(k=2, method="magnitude"), r"unknown selection method 'magnitude'.*diversity, l2, random, taylor"),
        (dict(k=2, backend="cuda"), r"unknown backend 'cuda'.*lapack, gram_schmidt"),
        (dict(k=2, method="taylor"), r"taylor.*scores=None"),
        (dict(k=2, method="taylor", scores=np.ones(9)), r"shape \(H,\) = \(10,\), got \(9,\)"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        select_neurons(gaussian(4, 10), **kwargs)


@pytest.mark.parametrize(
    "kernel, match",
    [
        (np.ones(8), r"2-D \(D, H\) fc1 kernel"),
        (np.ones((2, 3, 4)), r"2-D \(D, H\) fc1 kernel"),
        (np.ones((4, 8), np.int32), r"float dtype"),
        (np.full((4, 8), np.nan), r"NaN or Inf"),
        (jnp.full((4, 8), jnp.inf), r"NaN or Inf"),
    ],
)
def test_bad_kernel_raises(kernel, match):
    with pytest.raises(ValueError, match=match):
        select_neurons(kernel, 2)
