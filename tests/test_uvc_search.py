"""UVC search math: the FLOPs ratio, masks, the Lagrangian's terms, the search step and extraction with repair.

Several tests pin a bug of the official code (VITA-Group/UVC) that this implementation does not have: the
clipped constraint violation, the z schedule that never applies, masks missing from the search's forward pass,
a random "real FLOPs", and a budget missed by several points.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dgmr_jax as dj
from dgmr_jax.models.slim import masked_params
from dgmr_jax.train.state import OptimConfig
from dgmr_jax.uvc.config import SearchConfig, check_search
from dgmr_jax.uvc.extract import Extraction, extract, repair_bounds
from dgmr_jax.uvc.flops import fixed_flops, flops_ratio, layer_flops, masks_ratio, model_flops, num_tokens, plan_ratio
from dgmr_jax.uvc.land import land_counts, reach_budget
from dgmr_jax.uvc.masks import group_norms, masks_from_counts, ranks, rounded, ste_ceil, unit_mask
from dgmr_jax.uvc.objective import (
    ascend_duals,
    constraint_term,
    gumbel_gates,
    least_k_sum,
    project_duals,
    prox_shrink,
    z_lr_at,
)
from dgmr_jax.uvc.search import (
    deterministic_ratio,
    freeze_step,
    init_search_state,
    make_optimizers,
    make_search_step,
)
from dgmr_jax.uvc.state import Counts, Duals, SearchState, SearchVars

FROZEN = OptimConfig(base_lr=0.0, min_lr=0.0, total_steps=100, global_batch=256)


@pytest.fixture(scope="module")
def tiny():
    cfg = dj.models.preset("vit_tiny_patch16_224", depth=2, img_size=32)
    params = dj.models.init_params(cfg, 0)
    images = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
    return cfg, params, images


def _direct_flops(cfg, heads, value_width, neurons, gates) -> int:
    """The contract's formula written out in Python ints, independently of uvc.flops."""
    n, dd, d = num_tokens(cfg), cfg.width, cfg.attn_head_dim
    g = 2 if cfg.gated else 1
    total = 2 * cfg.grid**2 * 3 * cfg.patch_size**2 * dd
    total += 2 * dd * (cfg.num_classes * (2 if cfg.dist_token else 1) + cfg.proj_dim)
    for h, v, m, p in zip(heads, value_width, neurons, gates, strict=True):
        macs = n * dd * (2 * h * d + v) + n * n * h * d + n * n * v + n * v * dd + n * dd * m * g + n * m * dd
        total += p * 2 * macs
    return total


# -- FLOPs ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["vit_tiny_patch16_224", "deit_small_distilled_patch16_224", "eva02_small_patch14_224", "ViT-B-16"]
)
def test_flops_full_model_equals_count_flops(name):
    cfg = dj.models.preset(name, depth=3)
    full = dict(heads=[cfg.num_heads] * 3, value_width=[cfg.attn_dim] * 3, neurons=list(cfg.mlp_hidden), gates=[1] * 3)
    with jax.enable_x64(True):
        assert float(model_flops(cfg, **full)) == float(dj.prune.count_flops(cfg))
        assert float(flops_ratio(cfg, **full)) == 1.0
        # MLP-only pruning: the project's count_flops of the slimmer config, exactly
        widths = (cfg.mlp_hidden[0] // 3, 7, cfg.mlp_hidden[0])
        slim = cfg.replace(mlp_hidden=widths)
        got = flops_ratio(cfg, full["heads"], full["value_width"], widths, full["gates"])
        assert float(got) == dj.prune.count_flops(slim) / dj.prune.count_flops(cfg)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "eva02_small_patch14_224"])
def test_flops_ratio_matches_direct_formula_at_integers(name):
    cfg = dj.models.preset(name, depth=4)
    rng = np.random.default_rng(1)
    h, d, m = cfg.num_heads, cfg.attn_head_dim, cfg.mlp_hidden[0]
    for _ in range(20):
        heads = rng.integers(0, h + 1, 4)
        value = np.array([rng.integers(0, k * d + 1) for k in heads])
        neurons = rng.integers(0, m + 1, 4)
        gates = rng.integers(0, 2, 4)
        direct = _direct_flops(cfg, *(a.tolist() for a in (heads, value, neurons, gates)))
        with jax.enable_x64(True):
            assert float(model_flops(cfg, heads, value, neurons, gates)) == float(direct)
            r = float(flops_ratio(cfg, heads, value, neurons, gates))
        assert r == direct / dj.prune.count_flops(cfg)
        # the same arithmetic on Python ints (extraction's path) is exact too
        layers = zip(heads, value, neurons, gates, strict=True)
        exact = fixed_flops(cfg) + sum(int(p) * layer_flops(cfg, int(a), int(b), int(c)) for a, b, c, p in layers)
        assert exact == direct


@pytest.mark.slow
def test_masks_ratio_is_the_formula_and_differentiable(tiny):
    cfg, params, _ = tiny
    norms = group_norms(cfg, params)
    counts = Counts(jnp.array([1.0, 0.0]), jnp.array([[3.0, 0.0, 10.0], [0.0, 1.0, 2.0]]), jnp.array([100.0, 5.0]))
    gates = jnp.array([1.0, 1.0])
    with jax.enable_x64(True):
        m = masks_from_counts(counts.heads, counts.dims, counts.neurons, norms, "hard")
        heads = np.asarray(m.heads.sum(-1), int)
        value = np.asarray((m.heads * m.dims.sum(-1)).sum(-1), int)
        neurons = np.asarray(m.neurons.sum(-1), int)
        assert heads.tolist() == [2, 3] and neurons.tolist() == [668, 763]
        r = float(masks_ratio(cfg, m.heads, m.dims, m.neurons, gates))
    assert r == _direct_flops(cfg, heads.tolist(), value.tolist(), neurons.tolist(), [1, 1]) / dj.prune.count_flops(cfg)

    def ratio(c):
        mm = masks_from_counts(c.heads, c.dims, c.neurons, norms, "ste")
        return masks_ratio(cfg, mm.heads, mm.dims, mm.neurons, gates)

    g = jax.grad(ratio)(counts)
    # one more neuron / dim / head removed lowers R by exactly that unit's FLOPs share
    total = dj.prune.count_flops(cfg)
    np.testing.assert_allclose(g.neurons, -layer_flops(cfg, 0, 0, 1) / total, rtol=1e-6)
    assert np.all(np.asarray(g.dims)[1] < 0) and np.all(np.asarray(g.heads) < 0)


@pytest.mark.skipif(
    "layer_heads" not in {f.name for f in dataclasses.fields(dj.models.ModelConfig)},
    reason="needs the model side's layer_heads / value_dims (uvc-models branch)",
)
def test_flops_ratio_matches_count_flops_of_slim_config():
    cfg = dj.models.preset("vit_tiny_patch16_224", depth=3)
    d = cfg.attn_head_dim
    slim = cfg.replace(layer_heads=(2, 3, 1), value_dims=((d, 5), (1, 2, 3), (d,)), mlp_hidden=(10, 768, 3))
    with jax.enable_x64(True):
        r = float(flops_ratio(cfg, [2, 3, 1], [d + 5, 6, d], [10, 768, 3], [1, 1, 1]))
    assert r == dj.prune.count_flops(slim) / dj.prune.count_flops(cfg)


# -- masks and least-k sums ----------------------------------------------------------------------------------------


def test_unit_masks_ste_soft_hard():
    norms = jnp.array([0.5, 0.1, 0.9, 0.3])  # ranks 2, 0, 3, 1
    np.testing.assert_array_equal(ranks(norms), [2, 0, 3, 1])
    s = jnp.float32(1.4)  # ceil -> 2 removed: the units of rank 0 and 1
    np.testing.assert_array_equal(unit_mask(s, norms, "hard"), [1, 0, 1, 0])
    np.testing.assert_array_equal(unit_mask(s, norms, "ste"), [1, 0, 1, 0])
    # straight-through: d mask / ds = -1 on the next unit to go (rank 2), 0 elsewhere
    np.testing.assert_array_equal(jax.jacobian(lambda c: unit_mask(c, norms, "ste"))(s), [-1, 0, 0, 0])
    np.testing.assert_allclose(unit_mask(s, norms, "soft"), [1, 0, 1, 0.6], rtol=1e-6)
    # at least one unit kept, whatever the count
    np.testing.assert_array_equal(unit_mask(jnp.float32(9.0), norms, "hard"), [0, 0, 1, 0])
    np.testing.assert_array_equal(jax.jacobian(lambda c: unit_mask(c, norms, "ste"))(jnp.float32(3.0)), [0, 0, 0, 0])


def test_ste_ceil_and_rounded_counts():
    x = jnp.array([0.0, 0.2, 2.0, 2.5, 9.0])
    np.testing.assert_array_equal(ste_ceil(x), [0, 1, 2, 3, 9])
    np.testing.assert_array_equal(rounded(x, 4), [0, 1, 2, 3, 3])  # capped at n - 1: one unit kept
    np.testing.assert_array_equal(jax.grad(lambda v: rounded(v, 4).sum())(x), np.ones(5))


def test_least_k_sum_value_and_forward_difference_gradient():
    norms = jnp.array([[4.0, 1.0, 3.0, 2.0]])
    for s, value, slope in [(0.0, 0.0, 1.0), (0.2, 1.0, 2.0), (2.0, 3.0, 3.0), (2.5, 6.0, 4.0), (7.0, 6.0, 4.0)]:
        c = jnp.array([s])
        assert float(least_k_sum(c, norms)[0]) == value
        assert float(jax.grad(lambda x: least_k_sum(x, norms).sum())(c)[0]) == slope


# -- the Lagrangian's terms and updates ----------------------------------------------------------------------------


def test_constraint_gradient_is_not_clipped(tiny):
    """Official bug: R - budget clamped to +-0.5 by value, so dR/ds = 0 when |R - budget| > 0.5."""
    cfg, params, _ = tiny
    norms = group_norms(cfg, params)
    zeros = Counts(jnp.zeros(2), jnp.zeros((2, 3)), jnp.zeros(2))
    budget, z = 0.3, jnp.float32(1.0)

    def ratio(c):
        m = masks_from_counts(c.heads, c.dims, c.neurons, norms, "ste")
        return masks_ratio(cfg, m.heads, m.dims, m.neurons, jnp.ones(2))

    assert float(ratio(zeros)) - budget == pytest.approx(0.7)
    ours = jax.grad(lambda c: constraint_term(ratio(c), budget, z))(zeros)
    official = jax.grad(lambda c: z * jnp.clip(ratio(c) - budget, -0.5, 0.5))(zeros)
    print(
        f"\nR - budget = {float(ratio(zeros)) - budget:.3f}: dL/ds3 ours {np.asarray(ours.neurons)}, "
        f"official-clipped {np.asarray(official.neurons)}"
    )
    for leaf in jax.tree_util.tree_leaves(ours):
        assert np.all(np.asarray(leaf) < 0)
    for leaf in jax.tree_util.tree_leaves(official):
        assert np.all(np.asarray(leaf) == 0)


def test_z_lr_schedule_values():
    schedule = ((0, 1.0), (3, 10.0), (7, 0.5))
    got = [float(z_lr_at(schedule, jnp.int32(t))) for t in range(10)]
    assert got == [1.0, 1.0, 1.0, 10.0, 10.0, 10.0, 10.0, 0.5, 0.5, 0.5]


def test_duals_projected_nonnegative():
    duals = Duals(jnp.array([0.1, 0.0]), jnp.array([0.0, 0.2]), jnp.zeros((2, 3)), jnp.float32(0.05))
    terms = Counts(jnp.array([1.0, 0.0]), jnp.ones((2, 3)), jnp.zeros(2))
    new = ascend_duals(duals, terms, jnp.float32(0.4), 0.5, y_lr=0.1, p_lr=0.1, z_lr=jnp.float32(1.0))
    assert float(new.z) == 0.0  # 0.05 + (0.4 - 0.5) < 0, projected
    np.testing.assert_allclose(new.y_heads, [0.2, 0.0])
    np.testing.assert_allclose(new.p_dims, 0.1)
    neg = project_duals(Duals(-jnp.ones(2), jnp.ones(2), -jnp.ones((2, 3)), jnp.float32(-3.0)))
    assert all(float(jnp.min(x)) >= 0 for x in jax.tree_util.tree_leaves(neg))


def test_multiplicative_z_ascent_scales_z_both_ways():
    duals = Duals(jnp.zeros(2), jnp.zeros(2), jnp.zeros((2, 3)), jnp.float32(2.0))
    terms = Counts(jnp.zeros(2), jnp.zeros((2, 3)), jnp.zeros(2))
    up, down = (
        ascend_duals(duals, terms, jnp.float32(r), 0.5, 0.0, 0.0, jnp.float32(3.0), multiplicative=True)
        for r in (0.7, 0.3)
    )
    assert float(up.z) == pytest.approx(2.0 * np.exp(0.6), rel=1e-6)
    assert float(down.z) == pytest.approx(2.0 * np.exp(-0.6), rel=1e-6)  # under budget: falls, stays > 0


def test_prox_shrinks_only_groups_about_to_go(tiny):
    cfg, params, _ = tiny
    norms = group_norms(cfg, params)
    counts = Counts(jnp.array([1.0, 0.0]), jnp.array([[0.0, 2.0, 0.0], [0.0, 0.0, 0.0]]), jnp.array([3.0, 0.0]))
    duals = Duals(jnp.array([0.5, 0.5]), jnp.array([2.0, 2.0]), jnp.full((2, 3), 1.0), jnp.float32(1.0))
    lr = 0.1
    out = prox_shrink(cfg, params, counts, duals, jnp.float32(lr))
    proj_in = np.asarray(params["blocks_0"]["attn"]["proj"]["kernel"]).reshape(3, 64, -1)
    proj_out = np.asarray(out["blocks_0"]["attn"]["proj"]["kernel"]).reshape(3, 64, -1)
    head = int(np.argmin(norms.heads[0]))
    dims = np.flatnonzero(np.asarray(ranks(norms.dims[0, 1])) < 2)
    expect = np.ones((3, 64))
    expect[head] /= 1 + 2 * lr * 0.5
    expect[1, dims] /= 1 + 2 * lr * 1.0
    np.testing.assert_allclose(proj_out, proj_in * expect[..., None], rtol=1e-6)
    fc2_in, fc2_out = (np.asarray(p["blocks_0"]["mlp"]["fc2"]["kernel"]) for p in (params, out))
    gone = np.asarray(ranks(norms.neurons[0])) < 3
    np.testing.assert_allclose(fc2_out[gone], fc2_in[gone] / (1 + 2 * lr * 2.0), rtol=1e-6)
    np.testing.assert_array_equal(fc2_out[~gone], fc2_in[~gone])
    np.testing.assert_array_equal(
        out["blocks_1"]["attn"]["proj"]["kernel"], params["blocks_1"]["attn"]["proj"]["kernel"]
    )


def test_gumbel_gates_relaxed_and_deterministic_eval():
    logits = jnp.array([[-1.0, 1.0], [2.0, -2.0]])
    pi = gumbel_gates(logits, jnp.zeros((2, 2)), 0.5)
    np.testing.assert_allclose(pi, jax.nn.sigmoid(jnp.array([4.0, -8.0])), rtol=1e-6)


# -- the search step -----------------------------------------------------------------------------------------------


_STEPS = {}  # one compiled step per (model, search config) across tests


def _setup(cfg, params, **kw):
    scfg = SearchConfig(**{"budget": 0.3, "weights": FROZEN, "count_lr": 0.05, **kw})
    if (cfg, scfg) not in _STEPS:
        optimizers = make_optimizers(cfg, scfg)
        _STEPS[cfg, scfg] = optimizers, jax.jit(make_search_step(cfg, scfg, optimizers))
    optimizers, step = _STEPS[cfg, scfg]
    return scfg, init_search_state(cfg, params, scfg, optimizers), step


@pytest.mark.slow
def test_counts_move_on_first_step_at_budget_03_with_frozen_weights(tiny):
    cfg, params, images = tiny
    scfg, state, step = _setup(cfg, params)
    new, metrics = step(state, params, images, jax.random.PRNGKey(0))
    for a, b in zip(jax.tree_util.tree_leaves(new.params), jax.tree_util.tree_leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)  # zero weight lr: frozen
    print(
        f"\nstep 0 at budget 0.3: R {float(metrics['ratio']):.4f} (hard {float(metrics['ratio_hard']):.4f}); "
        f"z {float(state.duals.z):.4g} -> {float(new.duals.z):.4f}; mean counts removed heads "
        f"{float(new.vars.counts.heads.mean()):.3f} dims {float(new.vars.counts.dims.mean()):.3f} "
        f"neurons {float(new.vars.counts.neurons.mean()):.3f}"
    )
    assert float(new.duals.z) > float(state.duals.z)
    np.testing.assert_allclose(float(new.duals.z), 1e-3 + 1.0 * (float(metrics["ratio"]) - 0.3), rtol=1e-6)
    # every kind moved up (a count whose distillation gradient outweighs z * dR/ds at z = 1e-3 may stay at 0:
    # the sampled gates make the student differ slightly from the teacher)
    for kind in ("heads", "dims", "neurons"):
        assert float(getattr(new.vars.counts, kind).mean()) > 0, kind


@pytest.mark.slow
def test_z_schedule_changes_z_step_across_boundary(tiny):
    """Official bug: PresetLRScheduler never finds its "zlr" key, so z keeps its first step size."""
    cfg, params, images = tiny
    scfg, state, step = _setup(cfg, params, warmup_steps=1, z_lr=((0, 1.0), (2, 10.0)), count_lr=0.0)
    deltas = []
    for t in range(4):
        z0 = float(state.duals.z)
        state, m = step(state, params, images, jax.random.PRNGKey(t))
        deltas.append((float(state.duals.z) - z0, float(m["ratio"]) - 0.3, float(m["z_lr"])))
    print("\n(z step, R - budget, z lr):", [tuple(round(v, 4) for v in d) for d in deltas])
    assert deltas[0][0] == 0.0  # warm-up: z frozen
    assert [d[2] for d in deltas[1:]] == [1.0, 1.0, 10.0]  # search steps 0, 1, 2
    for dz, viol, lr in deltas[1:]:
        assert dz == pytest.approx(lr * viol, rel=1e-5)
    assert deltas[3][0] / deltas[3][1] == pytest.approx(10 * deltas[2][0] / deltas[2][1], rel=1e-5)


@pytest.mark.slow
def test_frozen_gate_phase_runs_hard_gates_and_holds_logits(tiny):
    """The last gate_freeze of the search steps: argmax gates in the forward (R is the hard ratio), logits held
    (without the landing, which turns these skipped blocks back on: the budget is out of their reach)."""
    cfg, params, images = tiny
    weights = dataclasses.replace(FROZEN, total_steps=5)
    kw = dict(weights=weights, warmup_steps=1, gate_freeze=0.5, gate_init=(0.3, 0.2), land=False)
    scfg, state, step = _setup(cfg, params, **kw)
    assert freeze_step(scfg) == 3  # 4 search steps, the last 2 frozen
    seen = []
    for t in range(5):
        before = np.asarray(state.vars.gate_logits)
        state, m = step(state, params, images, jax.random.PRNGKey(t))
        moved = not np.array_equal(before, np.asarray(state.vars.gate_logits))
        seen.append((float(m["gates_frozen"]), moved))
        if t >= 3:
            assert float(m["ratio"]) == pytest.approx(float(m["ratio_hard"]), abs=1e-6)
    assert seen == [(0.0, False), (0.0, True), (0.0, True), (1.0, False), (1.0, False)]


@pytest.mark.slow
def test_land_counts_projects_onto_the_budget(tiny):
    """The landing's projection: value dims and neurons shifted to the largest hard ratio <= budget, heads held."""
    cfg, params, _ = tiny
    norms, logits = group_norms(cfg, params), jnp.array([[-1.0, 1.0], [-1.0, 1.0]])
    every, widths_only = Counts(1.0, 1.0, 1.0), Counts(1.0, 0.0, 1.0)
    start = Counts(jnp.array([1.0, 0.0]), jnp.array([[0.0, 5.0, 0.0], [2.0, 0.0, 0.0]]), jnp.array([0.0, 100.0]))
    heavy = Counts(jnp.array([1.0, 0.0]), jnp.full((2, 3), 60.0), jnp.array([700.0, 760.0]))
    unit = 4 * num_tokens(cfg) * cfg.width / dj.prune.count_flops(cfg)  # one neuron's (and one dim's) share
    for counts, flags in [(start, every), (heavy, every), (start, widths_only)]:
        landed = land_counts(cfg, counts, norms, jnp.ones(2), 0.5, flags)
        r = float(deterministic_ratio(cfg, params, SearchVars(landed, logits)))
        assert 0.5 - 2 * unit <= r <= 0.5, (r, flags)  # two layers' counts cross an integer together at worst
        np.testing.assert_array_equal(landed.heads, counts.heads)
        shift = (landed.neurons - counts.neurons) / cfg.mlp_hidden[0]
        assert float(shift[0]) == pytest.approx(float(shift[1]), abs=1e-6)  # one shift for every group
    np.testing.assert_array_equal(landed.dims, start.dims)  # dims not searched: not moved
    # one block skipped: 0.9 is out of reach, so everything comes back; 0.01 likewise, all but one unit goes
    low = land_counts(cfg, heavy, norms, jnp.array([1.0, 0.0]), 0.9, every)
    assert float(jnp.max(low.dims)) == 0.0 and float(jnp.max(low.neurons)) == 0.0
    high = land_counts(cfg, start, norms, jnp.ones(2), 0.01, every)
    np.testing.assert_array_equal(high.neurons, [cfg.mlp_hidden[0] - 1] * 2)
    np.testing.assert_array_equal(high.dims, np.full((2, 3), cfg.attn_head_dim - 1))


@pytest.mark.slow
def test_reach_budget_turns_back_the_least_sure_skipped_blocks(tiny):
    """Landing with the budget out of reach of the kept blocks: skipped blocks come back, smallest skip margin first."""
    cfg, params, _ = tiny
    norms, every = group_norms(cfg, params), Counts(1.0, 1.0, 1.0)
    heavy = Counts(jnp.array([1.0, 0.0]), jnp.full((2, 3), 60.0), jnp.array([700.0, 760.0]))
    both = jnp.array([[1.0, -1.0], [0.5, 0.0]])  # both skipped, block 1 the less sure
    base = fixed_flops(cfg) / dj.prune.count_flops(cfg)
    print(f"\nfixed FLOPs share {base:.3f}")
    one = np.asarray(reach_budget(cfg, heavy, norms, both, 0.3, every))
    np.testing.assert_array_equal(one, [[1.0, -1.0], [0.0, 0.5]])  # one block is enough; its logits swapped
    np.testing.assert_array_equal(reach_budget(cfg, heavy, norms, both, 0.7, every), [[-1.0, 1.0], [0.0, 0.5]])
    np.testing.assert_array_equal(reach_budget(cfg, heavy, norms, both, base / 2, every), both)  # in reach already
    kept_one = jnp.array([[-1.0, 1.0], [0.5, 0.0]])  # block 0 kept: with its widths restored 0.4 is in reach
    np.testing.assert_array_equal(reach_budget(cfg, heavy, norms, kept_one, 0.4, every), kept_one)
    np.testing.assert_array_equal(reach_budget(cfg, heavy, norms, kept_one, 0.7, every), [[-1.0, 1.0], [0.0, 0.5]])


@pytest.mark.slow
@pytest.mark.parametrize("seed,gate_init", [(0, (-1.0, 1.0)), (1, (-1.0, 1.0)), (0, (2.0, -2.0))])
def test_search_lands_on_its_budget(tiny, seed, gate_init):
    """With land, the search's own hard ratio (before extraction's repair) ends within 3 points under its budget,
    where the step before the frozen phase was more than 3 points off: above it by its counts, or (every block
    skipped from the start) below it, so the landing turns blocks back on."""
    cfg, params, _ = tiny
    weights = OptimConfig(base_lr=1e-3, min_lr=0.0, total_steps=24, global_batch=8, warmup_steps=2)
    scfg, state, step = _setup(
        cfg, params, budget=0.5, weights=weights, warmup_steps=2, gate_freeze=0.3, land=True, gate_init=gate_init
    )
    rng, before = np.random.default_rng(seed), None
    for t in range(24):
        images = rng.normal(size=(8, 32, 32, 3)).astype(np.float32)
        state, m = step(state, params, images, jax.random.PRNGKey(100 * seed + t))
        if t == freeze_step(scfg) - 1:
            before = float(m["ratio_hard"])
    hard = float(deterministic_ratio(cfg, state.params, state.vars))
    print(f"\nseed {seed}, gates {gate_init}: hard ratio {before:.4f} before the frozen phase, {hard:.4f} at the end")
    assert abs(before - 0.5) > 0.03 and 0.47 <= hard <= 0.5
    assert extract(cfg, state.params, state.vars, 0.5).ratio_searched == pytest.approx(hard, abs=1e-6)


@pytest.mark.slow
def test_duals_stay_nonnegative_over_steps(tiny):
    cfg, params, images = tiny
    scfg, state, step = _setup(cfg, params, budget=0.97, z_init=0.0, z_lr=((0, 5.0),), y_lr=1.0, p_lr=1.0)
    zs = []
    for t in range(6):
        state, _ = step(state, params, images, jax.random.PRNGKey(10 + t))
        for leaf in jax.tree_util.tree_leaves(state.duals):
            assert float(jnp.min(leaf)) >= 0
        zs.append(float(state.duals.z))
    print("\nz over steps at budget 0.97:", [round(z, 4) for z in zs])
    assert min(zs) == 0.0  # the projection was active


@pytest.mark.slow
def test_masks_are_applied_in_the_search_forward(tiny):
    """Official bug: masks were not applied in the search's forward, so the searched model was not the extracted."""
    cfg, params, images = tiny
    scfg, state, step = _setup(cfg, params, search_blocks=False)
    rng = jax.random.PRNGKey(0)
    _, m0 = step(state, params, images, rng)
    counts = dataclasses.replace(state.vars.counts, neurons=jnp.array([300.0, 0.0]))
    _, m1 = step(state.replace(vars=state.vars.replace(counts=counts)), params, images, rng)
    print(f"\ndistill loss: neurons removed 0 -> {float(m0['distill']):.4f}, 300 -> {float(m1['distill']):.4f}")
    assert float(m0["distill"]) <= 1e-12  # full masks, no gates: the student is the teacher (up to float rounding)
    assert float(m1["distill"]) > 1e-4
    # and it is the hard-masked model that the step evaluates
    masks = masks_from_counts(counts.heads, counts.dims, counts.neurons, group_norms(cfg, params), "hard")
    forward = jax.jit(dj.models.forward, static_argnums=0)
    student = forward(cfg, masked_params(cfg, params, masks.heads, masks.dims, masks.neurons), images)
    teacher = forward(cfg, params, images)
    cls = float(jnp.mean(jnp.square(student["pooled"] - teacher["pooled"])))
    assert float(m1["loss_cls"]) == pytest.approx(cls, rel=1e-5)


@pytest.mark.slow
def test_reported_flops_are_deterministic(tiny):
    """Official bug: the "real FLOPs" printed was a random Gumbel sample; ratio_hard is the argmax/rounded one."""
    cfg, params, images = tiny
    scfg, state, step = _setup(cfg, params)
    counts = Counts(jnp.array([1.3, 0.0]), jnp.full((2, 3), 7.2), jnp.array([100.0, 400.0]))
    svars = SearchVars(counts, jnp.array([[-1.0, 1.0], [0.5, -0.5]]))
    state = state.replace(vars=svars)
    hard = {float(step(state, params, images, jax.random.PRNGKey(k))[1]["ratio_hard"]) for k in range(3)}
    soft = {float(step(state, params, images, jax.random.PRNGKey(k))[1]["ratio"]) for k in range(3)}
    assert len(hard) == 1 and len(soft) > 1
    ex = extract(cfg, params, svars, 0.5, repair=False)
    assert hard.pop() == pytest.approx(ex.ratio_searched, rel=1e-6)
    assert float(deterministic_ratio(cfg, params, svars)) == pytest.approx(ex.ratio_searched, rel=1e-6)


def test_search_state_is_one_checkpointable_pytree(tiny, tmp_path):
    import orbax.checkpoint as ocp

    cfg, params, _ = tiny
    _, state, _ = _setup(cfg, params)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    assert isinstance(jax.tree_util.tree_unflatten(treedef, leaves), SearchState)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "s", state)
    with ocp.StandardCheckpointer() as ckpt:
        back = ckpt.restore(tmp_path / "s", jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state))
    for a, b in zip(jax.tree_util.tree_leaves(back), leaves, strict=True):
        np.testing.assert_array_equal(a, b)


# -- input checks --------------------------------------------------------------------------------------------------


def test_input_checks(tiny):
    cfg, params, _ = tiny
    for budget in (0.0, 1.0, 1.5, -0.2, float("nan")):
        with pytest.raises(ValueError, match="budget"):
            check_search(cfg, SearchConfig(budget=budget))
    one_head = dj.models.preset("vit_tiny_patch16_224", depth=2, img_size=32, num_heads=1)
    with pytest.raises(ValueError, match="single head"):
        check_search(one_head, SearchConfig(budget=0.5, search_heads=True))
    assert SearchConfig(budget=0.5).resolve(one_head).search_heads is False
    assert SearchConfig(budget=0.5).resolve(cfg).search_heads is True
    with pytest.raises(ValueError, match="neurons_init"):
        check_search(cfg, SearchConfig(budget=0.5, neurons_init=1.0))
    with pytest.raises(ValueError, match="z_lr"):
        check_search(cfg, SearchConfig(budget=0.5, z_lr=((1, 1.0),)))
    with pytest.raises(ValueError, match="one MLP width"):
        check_search(cfg.replace(mlp_hidden=(768, 700)), SearchConfig(budget=0.5))
    with pytest.raises(ValueError, match="tau"):
        check_search(cfg, SearchConfig(budget=0.5, tau=0.0))
    with pytest.raises(ValueError, match=r"gate_freeze is a fraction of the search steps in \[0, 1\), got 1.0"):
        check_search(cfg, SearchConfig(budget=0.5, gate_freeze=1.0))
    with pytest.raises(ValueError, match="z_init must be > 0, got 0.0"):
        check_search(cfg, SearchConfig(budget=0.5, z_ascent="multiplicative", z_init=0.0))
    with pytest.raises(ValueError, match="land=True projects the counts in the frozen-gate phase: set gate_freeze"):
        check_search(cfg, SearchConfig(budget=0.5, gate_freeze=0.0))
    with pytest.raises(ValueError, match="land=True moves value-dim and neuron counts"):
        check_search(cfg, SearchConfig(budget=0.5, gate_freeze=0.3, land=True, search_dims=False, search_neurons=False))
    with pytest.raises(ValueError, match="z_ascent must be one of"):
        check_search(cfg, SearchConfig(budget=0.5, z_ascent="pid"))
    with pytest.raises(ValueError, match="budget"):
        make_search_step(cfg, SearchConfig(budget=1.2), make_optimizers(cfg, SearchConfig(budget=0.5)))
    other = dj.models.preset("vit_small_patch16_224", depth=2, img_size=32)
    with pytest.raises(ValueError, match="teacher vit_small_patch16_224 .* token width 384 vs 192, pooled width 3"):
        make_search_step(cfg, SearchConfig(budget=0.5), make_optimizers(cfg, SearchConfig(budget=0.5)), other)
    kd = SearchConfig(budget=0.5, kd_coef=1.0)
    with pytest.raises(ValueError, match=r"same classes on both sides: vit_tiny_patch16_224 \(searched\) has 1000,"):
        make_search_step(cfg, kd, make_optimizers(cfg, kd), cfg.replace(num_classes=10))
    svars = SearchVars(Counts(jnp.zeros(2), jnp.zeros((2, 3)), jnp.zeros(2)), jnp.zeros((2, 2)))
    with pytest.raises(ValueError, match="teacher_params"):
        extract(cfg, params, svars, 0.5, select="diversity")
    with pytest.raises(ValueError, match="budget"):
        extract(cfg, params, svars, 1.0)
    with pytest.raises(ValueError, match="counts.dims has shape"):
        extract(cfg, params, svars.replace(counts=svars.counts.replace(dims=jnp.zeros((2, 4)))), 0.5)


# -- extraction ----------------------------------------------------------------------------------------------------


def _random_vars(cfg, rng):
    h, d, m = cfg.num_heads, cfg.attn_head_dim, cfg.mlp_hidden[0]
    counts = Counts(
        jnp.asarray(rng.uniform(0, h - 1, cfg.depth), jnp.float32),
        jnp.asarray(rng.uniform(0, d - 1, (cfg.depth, h)), jnp.float32),
        jnp.asarray(rng.uniform(0, m - 1, cfg.depth), jnp.float32),
    )
    return SearchVars(counts, jnp.asarray(rng.normal(size=(cfg.depth, 2)), jnp.float32))


@pytest.mark.slow
def test_extract_repair_lands_in_window_or_fails_clearly():
    """Searched blocks and heads that leave the window out of the widths' reach are moved first (restored when
    the search skipped too much, removed when it kept too much); only a budget below the smallest model the
    structure allows (one block, one head, one dim, one neuron) is an error."""
    cfg = dj.models.preset("vit_small_patch16_224", depth=4, img_size=64)
    params = dj.models.init_params(cfg, 1)
    norms = group_norms(cfg, params)
    rng = np.random.default_rng(0)
    landed = moved = 0
    for _ in range(40):
        svars = _random_vars(cfg, rng)
        budget = float(rng.uniform(0.05, 0.95))
        keep = np.asarray(svars.gate_logits[:, 1] >= svars.gate_logits[:, 0])
        head_keep = np.asarray(ranks(norms.heads)) >= np.minimum(np.ceil(np.asarray(svars.counts.heads)), 5)[:, None]
        low, high = repair_bounds(cfg, keep, head_keep.astype(int))
        ex = extract(cfg, params, svars, budget)
        assert budget - 0.02 <= ex.ratio <= budget, ex.summary()
        assert plan_ratio(cfg, ex.plan) == ex.ratio
        within = low <= budget and high >= budget - 0.02
        assert (ex.blocks_moved + ex.heads_moved == 0) == within  # structure moves only when the widths cannot
        landed += 1
        moved += not within
    print(f"\nrepair: {landed} budgets landed in the window, {moved} of them after moving blocks or heads")
    assert moved >= 10
    smallest = repair_bounds(cfg, np.eye(4, dtype=bool)[0], np.eye(4, 6, dtype=int))[0]
    with pytest.raises(ValueError, match="out of reach"):
        extract(cfg, params, _random_vars(cfg, rng), smallest / 2)


def test_extract_plan_is_the_hard_masked_search_result(tiny):
    cfg, params, _ = tiny
    svars = _random_vars(cfg, np.random.default_rng(3))
    svars = svars.replace(gate_logits=jnp.array([[-1.0, 1.0], [1.0, -1.0]]))
    ex = extract(cfg, params, svars, 0.5, repair=False)
    assert isinstance(ex, Extraction) and ex.ratio == ex.ratio_searched
    assert [u.keep_block for u in ex.plan] == [True, False]
    m = masks_from_counts(svars.counts.heads, svars.counts.dims, svars.counts.neurons, group_norms(cfg, params), "hard")
    u = ex.plan[0]
    assert list(u.heads) == np.flatnonzero(np.asarray(m.heads[0])).tolist()
    for h, dims in zip(u.heads, u.dims, strict=True):
        assert list(dims) == np.flatnonzero(np.asarray(m.dims[0, h])).tolist()
    assert list(u.neurons) == np.flatnonzero(np.asarray(m.neurons[0])).tolist()
    assert ex.plan[1] == type(u)(keep_block=False, heads=(), dims=(), neurons=())
    # no_skip keeps every block, widths only
    assert all(v.keep_block for v in extract(cfg, params, svars, 0.5, repair=False, no_skip=True).plan)


@pytest.mark.slow
def test_extract_neuron_selection_methods():
    cfg = dj.models.preset("eva02_small_patch14_224", depth=2, img_size=28)  # gated (SwiGLU) MLP
    teacher = dj.models.init_params(cfg, 0)
    student = jax.tree_util.tree_map(lambda x: x * 1.01, teacher)
    svars = SearchVars(Counts(jnp.zeros(2), jnp.zeros((2, 6)), jnp.array([600.0, 100.0])), jnp.ones((2, 2)))
    widths = [1024 - 600, 1024 - 100]
    for method in ("uvc", "diversity", "l2", "random", "taylor"):
        scores = [np.arange(1024.0)] * 2 if method == "taylor" else None
        ex = extract(cfg, student, svars, 0.9, select=method, teacher_params=teacher, scores=scores, repair=False)
        assert [len(u.neurons) for u in ex.plan] == widths
        if method == "diversity":
            mlp = teacher["blocks_1"]["mlp"]
            want = dj.prune.select_neurons(dj.prune.mlp.selection_matrix(cfg, mlp), widths[1], "diversity")
            assert list(ex.plan[1].neurons) == sorted(want.tolist())
        if method == "taylor":
            assert list(ex.plan[0].neurons) == list(range(600, 1024))


# -- end to end ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_search_end_to_end(tiny):
    cfg, params, _ = tiny
    budget = 0.5
    weights = OptimConfig(base_lr=1e-4, warmup_steps=0, total_steps=30, global_batch=256)
    scfg, state, step = _setup(cfg, params, budget=budget, weights=weights, warmup_steps=2, count_lr=0.02)
    rng = np.random.default_rng(1)
    r0 = float(deterministic_ratio(cfg, state.params, state.vars))
    history = []
    for t in range(30):
        images = rng.normal(size=(4, 32, 32, 3)).astype(np.float32)
        state, m = step(state, params, images, jax.random.PRNGKey(t))
        history.append((float(m["ratio_hard"]), float(m["z"]), float(m["distill"])))
    r1 = float(deterministic_ratio(cfg, state.params, state.vars))
    ex = extract(cfg, state.params, state.vars, budget)
    print(
        f"\nend to end, budget {budget}: R (deterministic) {r0:.4f} -> {r1:.4f}; z {history[0][1]:.4g} -> "
        f"{float(state.duals.z):.4f}; distill {history[2][2]:.3g} -> {history[-1][2]:.4f}"
    )
    print(ex.summary())
    print("R_hard by step:", [round(h[0], 3) for h in history])
    assert r0 == 1.0 and abs(r1 - budget) < abs(r0 - budget) - 0.2
    assert budget - 0.02 <= ex.ratio <= budget
