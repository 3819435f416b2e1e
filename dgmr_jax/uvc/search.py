"""One UVC search step as a pure function of pytrees: masked, gated student forward, the Lagrangian's gradients,
AdamW + proximal shrink for the weights, Adam/SGD for counts and gate logits, projected ascent for the duals, and
in the frozen-gate phase the landing of the counts on the budget (land.py).

Sharding-agnostic: the step neither knows nor sets shardings, so a trainer can jit it with in/out shardings over a
mesh (the state is one pytree, see state.py) and donate the state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dgmr_jax.core.errors import UserError
from dgmr_jax.distill.loss import check_pair, distill_loss, tap_config
from dgmr_jax.models.config import ModelConfig
from dgmr_jax.models.slim import masked_norm_statistics
from dgmr_jax.models.tree import Params
from dgmr_jax.models.vit import forward
from dgmr_jax.train.state import lr_schedule, make_optimizer
from dgmr_jax.uvc.config import SearchConfig
from dgmr_jax.uvc.flops import masks_ratio
from dgmr_jax.uvc.land import land_counts, reach_budget
from dgmr_jax.uvc.masks import Masks, apply_masks, group_norms, masks_from_counts
from dgmr_jax.uvc.objective import (
    ascend_duals,
    constraint_term,
    gumbel_gates,
    hard_gates,
    keep_probability,
    prox_shrink,
    sparsity_penalty,
    sparsity_terms,
    z_lr_at,
)
from dgmr_jax.uvc.state import Counts, SearchState, SearchVars, group_sizes, init_duals, init_vars

# Adam's epsilon for the counts: a count's gradient is a FLOPs share per unit times z (~1e-5 * z for a ViT-B
# neuron), so the usual 1e-8 would swallow it while z is small
COUNT_ADAM_EPS = 1e-12


class Optimizers(NamedTuple):
    """The three optax transformations of a search: weights (AdamW), counts, gate logits."""

    weights: optax.GradientTransformation
    counts: optax.GradientTransformation
    gates: optax.GradientTransformation


def _per_leaf(fn: Callable[[jax.Array, Any], jax.Array], extra: Any = None) -> optax.GradientTransformation:
    """A stateless transformation applying fn(update, extra_leaf) to each leaf."""

    def update(updates, state, params=None):
        del params
        if extra is None:
            return jax.tree_util.tree_map(lambda u: fn(u, None), updates), state
        return jax.tree_util.tree_map(fn, updates, extra), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizers(cfg: ModelConfig, scfg: SearchConfig) -> Optimizers:
    """AdamW of scfg.weights; counts: max-abs clip to 1 per array (official), Adam(b1=0)/SGD at count_lr, scaled
    to each group's size; gates: SGD with momentum or Adam, averaged over gate_every steps."""
    sizes = jax.tree_util.tree_map(float, group_sizes(cfg))
    clip = _per_leaf(lambda g, _: g / jnp.maximum(1.0, jnp.max(jnp.abs(g))))
    if scfg.count_optimizer == "adam":
        base = optax.adam(scfg.count_lr, b1=0.0, b2=0.999, eps=COUNT_ADAM_EPS)
    else:
        base = optax.sgd(scfg.count_lr)
    counts = optax.chain(clip, base, _per_leaf(lambda u, n: u * n, sizes))
    if scfg.gate_optimizer == "sgd":
        gates = optax.sgd(scfg.gate_lr, momentum=scfg.gate_momentum or None)
    else:
        gates = optax.adam(scfg.gate_lr)
    if scfg.gate_every > 1:
        gates = optax.MultiSteps(gates, every_k_schedule=scfg.gate_every)
    return Optimizers(make_optimizer(scfg.weights), counts, gates)


def init_search_state(cfg: ModelConfig, params: Params, scfg: SearchConfig, optimizers: Optimizers) -> SearchState:
    """Fresh state owning its buffers (donation-safe): counts and duals at their inits, optimizer states."""
    scfg = scfg.resolve(cfg)
    params = jax.tree_util.tree_map(lambda p: jnp.array(p, copy=True), params)
    svars = init_vars(cfg, scfg)
    return SearchState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        vars=svars,
        duals=init_duals(cfg, scfg),
        opt_weights=optimizers.weights.init(params),
        opt_counts=optimizers.counts.init(svars.counts),
        opt_gates=optimizers.gates.init(svars.gate_logits),
    )


def project_counts(cfg: ModelConfig, counts: Counts) -> Counts:
    """Counts clipped into [0, n - 1] for groups of n units (>= 1 unit kept)."""
    return jax.tree_util.tree_map(lambda c, n: jnp.clip(c, 0.0, n - 1), counts, group_sizes(cfg))


def count_flags(scfg: SearchConfig) -> Counts:
    """1.0 for each kind of count the (resolved) search moves, 0.0 for the others."""
    flags = (bool(scfg.search_heads), scfg.search_dims, scfg.search_neurons)
    return Counts(*(float(f) for f in flags))


def current_masks(cfg: ModelConfig, params: Params, svars: SearchVars, mode: str = "hard") -> Masks:
    """Masks of the rounded counts on the current weights' norms."""
    c = svars.counts
    return masks_from_counts(c.heads, c.dims, c.neurons, group_norms(cfg, params), mode)


def freeze_step(scfg: SearchConfig) -> int:
    """The first step of the frozen-gate phase: the last gate_freeze of the search steps (never, at 0)."""
    total = scfg.weights.total_steps
    return total - round(scfg.gate_freeze * max(total - scfg.warmup_steps, 0)) if scfg.gate_freeze else total + 1


def deterministic_ratio(cfg: ModelConfig, params: Params, svars: SearchVars, search_blocks: bool = True) -> jax.Array:
    """The FLOPs ratio of what extraction (before repair) would keep: rounded counts, argmax gates."""
    m = current_masks(cfg, params, svars, "hard")
    gates = hard_gates(svars.gate_logits) if search_blocks else jnp.ones((cfg.depth,), jnp.float32)
    return masks_ratio(cfg, m.heads, m.dims, m.neurons, gates)


def _features(cfg: ModelConfig, params: Params, images: jax.Array, gates: jax.Array | None, kd: bool = False):
    """(pooled, patch tokens), and the head's logits for logit distillation."""
    out = forward(cfg, params, images, gates=gates)
    feats = (out["pooled"], out["tokens"][:, cfg.num_prefix_tokens :])
    return (*feats, out["logits"]) if kd else feats


def logit_kd(student: jax.Array, teacher: jax.Array, temperature: float) -> jax.Array:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), batch mean: the paper's logit distillation."""
    t = jax.nn.log_softmax(teacher.astype(jnp.float32) / temperature, axis=-1)
    s = jax.nn.log_softmax(student.astype(jnp.float32) / temperature, axis=-1)
    return temperature**2 * jnp.mean(jnp.sum(jnp.exp(t) * (t - s), axis=-1))


def _norm_statistics(cfg: ModelConfig, masks: Masks) -> contextlib.AbstractContextManager:
    """Norms inside a pruned width (q/k norm over all heads, attention-output and hidden norms) take their
    statistics over the kept units, as they will in the extracted model; a no-op for models without them."""
    if not (cfg.qk_norm or cfg.attn_norm or cfg.mlp_norm):
        return contextlib.nullcontext()
    return masked_norm_statistics(cfg, masks.heads, masks.dims, masks.neurons)


def check_teacher(
    cfg: ModelConfig, teacher_cfg: ModelConfig, scfg: SearchConfig, names: tuple[str, str] = ("searched", "teacher")
) -> None:
    """A teacher other than the searched model must give the distilled tensors their shapes (distill.loss.check_pair),
    and with kd_coef its logits too; `names` says which (searched, teacher) models these are."""
    check_pair(cfg, teacher_cfg, scfg.tap, names)
    if scfg.kd_coef and cfg.num_classes != teacher_cfg.num_classes:
        raise UserError(
            f"logit distillation (kd_coef > 0) needs the same classes on both sides: {cfg.name} ({names[0]}) has "
            f"{cfg.num_classes}, teacher {teacher_cfg.name} ({names[1]}) {teacher_cfg.num_classes}; set kd_coef=0"
        )


def make_search_step(
    cfg: ModelConfig,
    scfg: SearchConfig,
    optimizers: Optimizers,
    teacher_cfg: ModelConfig | None = None,
) -> Callable[[SearchState, Params, jax.Array, jax.Array], tuple[SearchState, dict[str, jax.Array]]]:
    """The pure search step: step(state, teacher_params, images, rng) -> (state, metrics).

    cfg is the tower being compressed (the student, full shapes); teacher_cfg defaults to cfg. Settings are
    checked here, before anything is traced. rng draws this step's Gumbel noise (one sample per block per step).
    Metrics: loss (the Lagrangian), distill (+ loss_cls, loss_feat), penalty, ratio (R at the sampled gates and
    rounded counts, what z sees; gates at warmup_gate during the warm-up), ratio_hard (deterministic: argmax
    gates, rounded counts), z (this step's, before its ascent), z_lr, lr, mean counts removed (heads, dims,
    neurons), mean duals, mean P(keep), warmup (1.0 during the warm-up).
    """
    scfg = scfg.resolve(cfg)
    teacher_cfg = teacher_cfg or cfg
    student_tap, teacher_tap = tap_config(cfg, scfg.tap), tap_config(teacher_cfg, scfg.tap)
    if teacher_cfg != cfg:
        check_teacher(cfg, teacher_cfg, scfg)
    weight_lr = lr_schedule(scfg.weights)
    flags = count_flags(scfg)
    kd = scfg.kd_coef > 0

    freeze = freeze_step(scfg)

    def step(state: SearchState, teacher_params: Params, images: jax.Array, rng: jax.Array):
        warm = state.step < scfg.warmup_steps
        frozen = state.step >= freeze
        target = _features(teacher_tap, teacher_params, images.astype(teacher_cfg.dtype), None, kd)
        target = jax.lax.stop_gradient(target)
        gumbel = jax.random.gumbel(rng, (cfg.depth, 2), jnp.float32)
        objective = _objective(cfg, scfg, student_tap, state, images, target, gumbel, warm, frozen)
        grad_fn = jax.value_and_grad(objective, argnums=(0, 1, 2), has_aux=True)
        (loss, aux), (g_params, g_counts, g_logits) = grad_fn(state.params, state.vars.counts, state.vars.gate_logits)
        g_counts = jax.tree_util.tree_map(lambda g, f: g * f, g_counts, flags)
        if not scfg.search_blocks:
            g_logits = jnp.zeros_like(g_logits)
        grads = (g_params, g_counts, g_logits)
        new_state, lr, z_lr = _apply_updates(cfg, scfg, optimizers, weight_lr, state, grads, aux, warm, frozen)
        return new_state, {**_metrics(cfg, scfg, state, loss, aux, lr, z_lr, warm), "gates_frozen": 1.0 * frozen}

    return step


def _objective(
    cfg: ModelConfig,
    scfg: SearchConfig,
    student_tap: ModelConfig,
    state: SearchState,
    images: jax.Array,
    target: Any,
    gumbel: jax.Array,
    warm: jax.Array,
    frozen: jax.Array,
) -> Callable[[Params, Counts, jax.Array], tuple[jax.Array, dict[str, Any]]]:
    """The Lagrangian of one step as a function of (weights, counts, gate logits): distillation loss of the
    masked, gated student against the teacher's `target`, sparsity penalty and the FLOPs constraint term."""
    depth, kd = cfg.depth, scfg.kd_coef > 0
    norms = group_norms(cfg, state.params)
    duals = state.duals

    def objective(params: Params, counts: Counts, logits: jax.Array):
        masks = masks_from_counts(counts.heads, counts.dims, counts.neurons, norms, scfg.mask_mode)
        if scfg.search_blocks:
            sample = jnp.where(frozen, hard_gates(logits), gumbel_gates(logits, gumbel, scfg.tau))
            pi = jnp.where(warm, scfg.warmup_gate, sample)
            gates = pi
        else:
            pi, gates = jnp.ones((depth,), jnp.float32), None
        with _norm_statistics(cfg, masks):
            student = _features(student_tap, apply_masks(cfg, params, masks), images, gates, kd)
        distill, terms = distill_loss(student[:2], target[:2], scfg.cls_coef, scfg.feat_coef)
        if kd:
            terms["loss_kd"] = logit_kd(student[2], target[2], scfg.kd_temperature)
            distill = distill + scfg.kd_coef * terms["loss_kd"]
        # the gates' share of dR is scaled by gate_flops_weight; R's value is unchanged
        pi_flops = jax.lax.stop_gradient(pi) + scfg.gate_flops_weight * (pi - jax.lax.stop_gradient(pi))
        ratio = masks_ratio(cfg, masks.heads, masks.dims, masks.neurons, pi_flops)
        least = sparsity_terms(counts, norms)
        penalty = sparsity_penalty(least, duals)
        total = distill + penalty + constraint_term(ratio, scfg.budget, duals.z)
        return total, dict(distill=distill, **terms, penalty=penalty, ratio=ratio, least=least)

    return objective


def _apply_updates(
    cfg: ModelConfig,
    scfg: SearchConfig,
    optimizers: Optimizers,
    weight_lr: Callable[[jax.Array], jax.Array],
    state: SearchState,
    grads: tuple[Params, Counts, jax.Array],
    aux: dict[str, Any],
    warm: jax.Array,
    frozen: jax.Array,
) -> tuple[SearchState, jax.Array, jax.Array]:
    """The next state from the gradients of (weights, counts, gate logits); (state, weights' lr, z's lr).
    Warm-up: weights only; frozen gates: everything but the gate logits (with land, the counts then projected
    onto the budget)."""
    g_params, g_counts, g_logits = grads
    t, duals = state.step, state.duals
    # weights: AdamW, then the proximal shrink of the groups the current counts remove
    updates, opt_weights = optimizers.weights.update(g_params, state.opt_weights, state.params)
    params = optax.apply_updates(state.params, updates)
    lr = weight_lr(t)
    params = prox_shrink(cfg, params, state.vars.counts, duals, lr)

    # counts and gates: descent, counts projected into [0, n - 1]
    c_updates, opt_counts = optimizers.counts.update(g_counts, state.opt_counts, state.vars.counts)
    counts = project_counts(cfg, optax.apply_updates(state.vars.counts, c_updates))
    l_updates, opt_gates = optimizers.gates.update(g_logits, state.opt_gates, state.vars.gate_logits)
    logits = optax.apply_updates(state.vars.gate_logits, l_updates)
    held = state.vars.gate_logits
    if scfg.land:  # frozen phase (land.py): blocks back where the budget is out of reach, counts onto the budget
        norms, flags = group_norms(cfg, params), count_flags(scfg)
        gates = jnp.ones((cfg.depth,), jnp.float32)
        if scfg.search_blocks:
            held = jnp.where(frozen, reach_budget(cfg, counts, norms, held, scfg.budget, flags), held)
            gates = hard_gates(held)
        landed = land_counts(cfg, counts, norms, gates, scfg.budget, flags)
        counts = jax.tree_util.tree_map(lambda c, landed: jnp.where(frozen, landed, c), counts, landed)

    # duals: projected ascent
    z_lr = z_lr_at(scfg.z_lr, jnp.maximum(t - scfg.warmup_steps, 0))
    multiplicative = scfg.z_ascent == "multiplicative"
    new_duals = ascend_duals(duals, aux["least"], aux["ratio"], scfg.budget, scfg.y_lr, scfg.p_lr, z_lr, multiplicative)

    # the warm-up trains the weights only
    keep = lambda old, new, hold=warm: jax.tree_util.tree_map(lambda o, n: jnp.where(hold, o, n), old, new)  # noqa: E731
    hold_gates = warm | frozen
    new_state = SearchState(
        step=t + 1,
        params=params,
        vars=SearchVars(keep(state.vars.counts, counts), keep(held, logits, hold_gates)),
        duals=keep(duals, new_duals),
        opt_weights=opt_weights,
        opt_counts=keep(state.opt_counts, opt_counts),
        opt_gates=keep(state.opt_gates, opt_gates, hold_gates),
    )
    return new_state, lr, z_lr


def _metrics(
    cfg: ModelConfig,
    scfg: SearchConfig,
    state: SearchState,
    loss: jax.Array,
    aux: dict[str, Any],
    lr: jax.Array,
    z_lr: jax.Array,
    warm: jax.Array,
) -> dict[str, jax.Array]:
    """The step's metrics (see make_search_step), of the state before the step."""
    c, duals = state.vars.counts, state.duals
    return {
        "loss": loss,
        "distill": aux["distill"],
        "loss_cls": aux["loss_cls"],
        "loss_feat": aux["loss_feat"],
        **({"loss_kd": aux["loss_kd"]} if scfg.kd_coef > 0 else {}),
        "penalty": aux["penalty"],
        "ratio": aux["ratio"],
        "ratio_hard": deterministic_ratio(cfg, state.params, state.vars, scfg.search_blocks),
        "z": duals.z,
        "z_lr": z_lr,
        "lr": lr,
        "heads_removed": jnp.mean(c.heads),
        "dims_removed": jnp.mean(c.dims),
        "neurons_removed": jnp.mean(c.neurons),
        "y_heads": jnp.mean(duals.y_heads),
        "y_neurons": jnp.mean(duals.y_neurons),
        "p_dims": jnp.mean(duals.p_dims),
        "keep_prob": jnp.mean(keep_probability(state.vars.gate_logits)),
        "warmup": warm.astype(jnp.float32),
    }
