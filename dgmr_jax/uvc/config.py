"""SearchConfig: every setting of a UVC search, and the checks that run before any work."""

from __future__ import annotations

import dataclasses
import math

import ml_collections

from dgmr_jax.core.errors import UserError
from dgmr_jax.distill.loss import TAPS
from dgmr_jax.models.config import ModelConfig
from dgmr_jax.train.state import OptimConfig
from dgmr_jax.uvc.masks import MASK_MODES

OPTIMIZERS = ("adam", "sgd")
Z_ASCENTS = ("additive", "multiplicative")


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """A UVC search: budget, phases, the optimizers of weights, counts and gates, the duals' steps.

    Steps are optimizer steps. The first `warmup_steps` train the weights only, every block gated by the constant
    `warmup_gate` (the official code mixes 0.5 * Block(x) + 0.5 * x): counts, gate logits and duals stay put. Then
    the search updates all of them; the last `gate_freeze` of the search steps hold the gates and, with `land`,
    project the counts onto the budget after each step. Count learning rates are in fractions of a group's size per
    step (a head count moves by up to count_lr * H heads, a neuron count by count_lr * M neurons), so one rate fits
    every kind.
    """

    budget: float  # target FLOPs ratio R of the extracted model, in (0, 1)
    warmup_steps: int = 0
    weights: OptimConfig = OptimConfig()  # AdamW of the weights (accum_steps 1, no EMA)
    # counts (heads, value dims, neurons removed)
    count_optimizer: str = "adam"  # adam (b1 0, as the official Adam option) | sgd
    count_lr: float = 0.01
    heads_init: float = 0.0  # initial fraction removed, per kind
    dims_init: float = 0.0
    neurons_init: float = 0.0
    search_heads: bool | None = None  # None: on when layers have more than one head
    search_dims: bool = True
    search_neurons: bool = True
    mask_mode: str = "ste"  # see masks.MASK_MODES
    # block skip gates: logits (skip, keep), Gumbel-softmax keep probability during the search
    search_blocks: bool = True
    gate_init: tuple[float, float] = (-1.0, 1.0)  # the official init
    tau: float = 0.5
    warmup_gate: float = 0.5
    gate_optimizer: str = "sgd"  # sgd (momentum gate_momentum) | adam
    gate_lr: float = 0.1
    gate_momentum: float = 0.9
    gate_every: int = 1  # apply the mean gate gradient every this many steps (the official gating_interval)
    # scales z * dR/dgates in the gates' gradient only (official gating_weight: 5 by default, 5e-4 in its script);
    # 0.1 kept a 2-layer toy search from skipping every block within 30 steps; not tuned on real data
    gate_flops_weight: float = 0.1
    # duals: y (heads, neurons) and p (dims) weight the sums of the k smallest group norms, z the FLOPs constraint
    y_init: float = 0.0
    p_init: float = 0.0
    z_init: float = 1e-3
    y_lr: float = 1e-4
    p_lr: float = 1e-4
    # z's step size: ((first search step, lr), ...) sorted by step, the first at step 0; search steps count from
    # the end of the warm-up
    z_lr: tuple[tuple[int, float], ...] = ((0, 1.0),)
    # "additive": z += z_lr * (R - budget), projected at 0 (the official ascent); "multiplicative": z *= exp(z_lr *
    # (R - budget)), scale-free, so z reaches the size the counts need and falls as fast when under budget
    z_ascent: str = "additive"
    # the last gate_freeze of the search steps (a fraction) run the blocks at their argmax gates, logits frozen, so R
    # and z see the hard ratio and only the counts move
    gate_freeze: float = 0.3
    # the landing (land.py): in the frozen-gate phase, after every step the value-dim and neuron counts are shifted by
    # one fraction of their groups to the largest hard ratio <= budget (a projection onto the budget, by bisection;
    # skipped blocks come back first if the budget is out of reach): the search ends on its budget by its own
    # counts, before the extraction's repair
    land: bool = True
    # distillation loss (dgmr_jax.distill.loss)
    tap: str = "output"
    cls_coef: float = 1.0
    feat_coef: float = 1.0
    # the paper's logit distillation (KL at temperature kd_temperature), added with weight kd_coef; needs a head
    kd_coef: float = 0.0
    kd_temperature: float = 1.0

    def resolve(self, cfg: ModelConfig) -> SearchConfig:
        """This config checked against the model (ValueError naming the setting), search_heads decided."""
        check_search(cfg, self)
        if self.search_heads is None:
            return dataclasses.replace(self, search_heads=cfg.num_heads > 1)
        return self


def check_search(cfg: ModelConfig, scfg: SearchConfig) -> None:
    """Raise ValueError for the first setting that cannot work, before anything is built."""
    check_model(cfg)
    check_budget(scfg.budget)
    if scfg.search_heads and cfg.num_heads == 1:
        raise UserError(
            f"search_heads=True but every layer of {cfg.name!r} has a single head, which UVC always keeps; "
            "set search_heads=False (or None): value dims, neurons and block skips are still searched"
        )
    sizes = {"heads_init": cfg.num_heads, "dims_init": cfg.attn_head_dim, "neurons_init": cfg.mlp_hidden[0]}
    for name, n in sizes.items():
        f = getattr(scfg, name)
        if not (math.isfinite(f) and 0 <= f <= (n - 1) / n):
            raise UserError(f"{name} is a fraction removed in [0, {(n - 1) / n:.4g}] (>= 1 of {n} kept), got {f}")
    if scfg.heads_init > 0 and not (scfg.search_heads or (scfg.search_heads is None and cfg.num_heads > 1)):
        raise UserError("heads_init > 0 needs the heads search (search_heads) on")
    if scfg.warmup_steps < 0:
        raise UserError(f"warmup_steps must be >= 0, got {scfg.warmup_steps}")
    if scfg.count_optimizer not in OPTIMIZERS or scfg.gate_optimizer not in OPTIMIZERS:
        raise UserError(f"count_optimizer and gate_optimizer must be one of {OPTIMIZERS}")
    if scfg.mask_mode not in MASK_MODES:
        raise UserError(f"mask_mode must be one of {MASK_MODES}, got {scfg.mask_mode!r}")
    if scfg.tap not in TAPS:
        raise UserError(f"tap must be one of {TAPS}, got {scfg.tap!r}")
    if scfg.kd_coef and not (cfg.num_classes and scfg.tap == "output"):
        raise UserError(
            f"kd_coef > 0 (logit distillation) needs a classification head and tap 'output'; {cfg.name!r} has "
            f"num_classes={cfg.num_classes}, tap={scfg.tap!r}: set kd_coef=0 to distil features only"
        )
    if not (math.isfinite(scfg.kd_temperature) and scfg.kd_temperature > 0):
        raise UserError(f"kd_temperature must be > 0, got {scfg.kd_temperature}")
    positive = {"tau": scfg.tau, "gate_every": scfg.gate_every}
    for name, v in positive.items():
        if not v > 0:
            raise UserError(f"{name} must be > 0, got {v}")
    nonneg = dict(
        count_lr=scfg.count_lr,
        gate_lr=scfg.gate_lr,
        gate_momentum=scfg.gate_momentum,
        gate_flops_weight=scfg.gate_flops_weight,
        kd_coef=scfg.kd_coef,
        y_init=scfg.y_init,
        p_init=scfg.p_init,
        z_init=scfg.z_init,
        y_lr=scfg.y_lr,
        p_lr=scfg.p_lr,
    )
    for name, v in nonneg.items():
        if not (math.isfinite(v) and v >= 0):
            raise UserError(f"{name} must be a finite number >= 0, got {v}")
    if scfg.z_ascent not in Z_ASCENTS:
        raise UserError(f"z_ascent must be one of {Z_ASCENTS}, got {scfg.z_ascent!r}")
    if scfg.z_ascent == "multiplicative" and not scfg.z_init > 0:
        raise UserError(f"z_ascent='multiplicative' scales z, so z_init must be > 0, got {scfg.z_init}")
    if not (math.isfinite(scfg.gate_freeze) and 0 <= scfg.gate_freeze < 1):
        raise UserError(f"gate_freeze is a fraction of the search steps in [0, 1), got {scfg.gate_freeze}")
    if scfg.land and not scfg.gate_freeze:
        raise UserError("land=True projects the counts in the frozen-gate phase: set gate_freeze > 0 (e.g. 0.3)")
    if scfg.land and not (scfg.search_dims or scfg.search_neurons):
        raise UserError("land=True moves value-dim and neuron counts: set search_dims or search_neurons")
    if not 0 <= scfg.warmup_gate <= 1:
        raise UserError(f"warmup_gate is a block gate in [0, 1], got {scfg.warmup_gate}")
    if len(scfg.gate_init) != 2 or not all(math.isfinite(v) for v in scfg.gate_init):
        raise UserError(f"gate_init must be two finite logits (skip, keep), got {scfg.gate_init}")
    _check_z_lr(scfg.z_lr)
    if scfg.weights.accum_steps != 1 or scfg.weights.ema_decay:
        raise UserError("the search's weight optimizer takes accum_steps=1 and ema_decay=0 (one update per step)")


def check_budget(b: float) -> None:
    """A FLOPs budget is a ratio strictly between 0 and 1."""
    if not (isinstance(b, (int, float)) and math.isfinite(b) and 0 < b < 1):
        raise UserError(f"budget must be a FLOPs ratio strictly between 0 and 1, got {b!r}")


def check_model(cfg: ModelConfig) -> None:
    """The search runs on an unpruned, uniform tower: same heads, value width and MLP width in every layer."""
    for field in ("layer_heads", "value_dims"):
        if getattr(cfg, field, ()):
            raise UserError(f"the UVC search needs a uniform model; {cfg.name!r} has {field} set (already slimmed)")
    if len(set(cfg.mlp_hidden)) != 1:
        raise UserError(
            f"the UVC search needs one MLP width in every layer; {cfg.name!r} has widths {sorted(set(cfg.mlp_hidden))}"
        )


def _check_z_lr(z_lr: tuple[tuple[int, float], ...]) -> None:
    ok = bool(z_lr) and all(len(p) == 2 for p in z_lr)
    if ok:
        steps = [int(s) for s, _ in z_lr]
        ok = steps[0] == 0 and steps == sorted(set(steps)) and all(math.isfinite(v) and v >= 0 for _, v in z_lr)
    if not ok:
        raise UserError(
            f"z_lr must be ((0, lr0), (step1, lr1), ...): strictly increasing search steps from 0, lrs >= 0; got {z_lr}"
        )


def search_defaults() -> dict:
    """The `config.uvc` block of a recipe: SearchConfig's defaults, no budget yet, and how extraction keeps
    neurons at the searched widths (select: uvc | diversity | l2 | random)."""
    skip = ("budget", "weights", "tap", "cls_coef", "feat_coef")  # the run's own optim and distill settings
    fields = {f.name: f.default for f in dataclasses.fields(SearchConfig) if f.name not in skip}
    return {"budget": 0.0, "select": "uvc", **fields}


def with_search(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of a teacher-student recipe with a `config.uvc` block (the defaults where it has none)."""
    config = ml_collections.ConfigDict(config.to_dict())
    if "uvc" not in config:
        config.uvc = ml_collections.ConfigDict(search_defaults())
    return config
