"""The landing of a UVC search (SearchConfig.land): in its frozen-gate phase, a projection onto the FLOPs budget.

After every frozen step the value-dim and neuron counts are shifted by one fraction of their groups to the largest
hard ratio (rounded counts, argmax gates: what extraction keeps before its repair) at or under the budget, so the
search ends on its budget by its own counts, and the last steps train the weights at the ratio they are extracted
at. The counts still take their gradient steps in between, so the phase moves width between layers and kinds at
a constant ratio. When the gates held at the freeze skip so much that even every width restored is under the
budget, the skipped blocks the gates were least sure of (largest keep - skip logit margin) come back first.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dgmr_jax.models.config import ModelConfig
from dgmr_jax.models.cost import count_flops
from dgmr_jax.uvc.flops import fixed_flops, layer_flops
from dgmr_jax.uvc.masks import GroupNorms, rounded, unit_mask
from dgmr_jax.uvc.objective import hard_gates
from dgmr_jax.uvc.state import Counts, group_sizes

# bisection steps of the shift in [-1, 1]: 2**-30 of a group, far below one unit of any model
LAND_ITERATIONS = 30


def shift_counts(cfg: ModelConfig, counts: Counts, delta: jax.Array, flags: Counts) -> Counts:
    """Value-dim and neuron counts of the searched kinds (flags 1.0) moved by delta of their group's size and
    clipped into [0, n - 1]; heads stay."""
    n = group_sizes(cfg)
    return Counts(
        counts.heads,
        jnp.clip(counts.dims + delta * flags.dims * n.dims, 0.0, n.dims - 1),
        jnp.clip(counts.neurons + delta * flags.neurons * n.neurons, 0.0, n.neurons - 1),
    )


def layer_shares(cfg: ModelConfig, counts: Counts, norms: GroupNorms) -> jax.Array:
    """(L,) each block's FLOPs over the full model's at these rounded counts, blocks run."""
    n = group_sizes(cfg)
    head_mask = unit_mask(counts.heads, norms.heads, "hard")
    value = jnp.sum(head_mask * (n.dims - rounded(counts.dims, n.dims)), axis=-1)
    flops = layer_flops(cfg, jnp.sum(head_mask, axis=-1), value, n.neurons - rounded(counts.neurons, n.neurons))
    return flops / float(count_flops(cfg))


def land_counts(
    cfg: ModelConfig, counts: Counts, norms: GroupNorms, gates: jax.Array, budget: float, flags: Counts
) -> Counts:
    """Counts shifted (shift_counts) by the smallest delta in [-1, 1] whose hard ratio at these gates and norms is
    <= budget, by bisection. Above the budget only when all but one unit removed is still above it, below it only
    when everything restored is still below."""
    base = fixed_flops(cfg) / count_flops(cfg)

    def halve(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) / 2
        ratio = base + jnp.sum(gates * layer_shares(cfg, shift_counts(cfg, counts, mid, flags), norms))
        over = ratio > budget
        return jnp.where(over, mid, lo), jnp.where(over, hi, mid)

    _, hi = jax.lax.fori_loop(0, LAND_ITERATIONS, halve, (jnp.float32(-1.0), jnp.float32(1.0)))
    return shift_counts(cfg, counts, hi, flags)


def reach_budget(
    cfg: ModelConfig, counts: Counts, norms: GroupNorms, logits: jax.Array, budget: float, flags: Counts
) -> jax.Array:
    """Gate logits (L, 2) with the fewest skipped blocks turned on (skip and keep logits swapped), largest keep -
    skip margin first, for the kept blocks with every searched width restored to reach the budget; unchanged when
    they already do (or nothing is skipped)."""
    gates = hard_gates(logits)
    full = layer_shares(cfg, shift_counts(cfg, counts, jnp.float32(-1.0), flags), norms)
    short = budget - fixed_flops(cfg) / count_flops(cfg) - jnp.sum(gates * full)  # > 0: out of reach
    skipped = gates == 0
    order = jnp.argsort(jnp.where(skipped, logits[:, 0] - logits[:, 1], jnp.inf))  # surest skips last
    gained = jnp.cumsum(jnp.where(skipped, full, 0.0)[order])
    # restore the first j of the order, j the fewest whose gain covers the shortfall (all skipped at most)
    needed = jnp.minimum(jnp.sum(gained < short) + 1, jnp.sum(skipped)) * (short > 0)
    rank = jnp.argsort(order)
    restore = skipped & (rank < needed)
    return jnp.where(restore[:, None], logits[:, ::-1], logits)
