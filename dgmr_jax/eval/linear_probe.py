"""Linear probe: multinomial logistic regression on frozen features, fitted full-batch with L-BFGS.

The objective is scikit-learn's: `sum_i CE(W x_i + b, y_i) + l2 / 2 * ||W||^2` (bias not penalized),
i.e. `LogisticRegression(C=1 / l2)` with the lbfgs solver, so probe numbers can be checked against
sklearn. We minimize it divided by the number of samples (same minimizer, better-scaled gradients)
with `optax.lbfgs` and its zoom line search inside one `lax.while_loop`, stopping when the gradient
norm falls below `tol` or after `steps` iterations. `linear_probe` standardizes features with the
train mean and std first, as `StandardScaler` would.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

from dgmr_jax.core.errors import UserError

_log = logging.getLogger(__name__)


class LogReg(NamedTuple):
    """A fitted multinomial logistic regression: logits = x @ w + b."""

    w: np.ndarray  # (dim, num_classes)
    b: np.ndarray  # (num_classes,)
    steps: int  # L-BFGS iterations run
    grad_norm: float  # gradient norm of the per-sample objective at the end

    def predict(self, feats: np.ndarray) -> np.ndarray:
        """Class with the largest logit for each row of feats."""
        return np.argmax(np.asarray(feats, np.float32) @ self.w + self.b, axis=1)


@jax.jit
def _fit(x: jnp.ndarray, y: jnp.ndarray, w0: jnp.ndarray, reg: jnp.ndarray, steps: jnp.ndarray, tol: jnp.ndarray):
    """L-BFGS on mean CE + reg / 2 * ||w||^2 from (w0, 0); returns (params, iterations, grad norm)."""

    def objective(params):
        logits = jnp.dot(x, params["w"], precision=jax.lax.Precision.HIGHEST) + params["b"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return ce + 0.5 * reg * jnp.sum(params["w"] ** 2)

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def step(carry):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=objective)
        return optax.apply_updates(params, updates), state

    def not_done(carry):
        _, state = carry
        count = otu.tree_get(state, "count")
        return (count == 0) | ((count < steps) & (otu.tree_norm(otu.tree_get(state, "grad")) >= tol))

    params = {"w": w0, "b": jnp.zeros(w0.shape[1], jnp.float32)}
    params, state = jax.lax.while_loop(not_done, step, (params, opt.init(params)))
    return params, otu.tree_get(state, "count"), otu.tree_norm(jax.grad(objective)(params))


def fit_logreg(
    feats: np.ndarray,
    labels: np.ndarray,
    l2: float = 1e-3,
    num_classes: int | None = None,
    steps: int = 1000,
    tol: float = 1e-6,
) -> LogReg:
    """Fit multinomial logistic regression (sklearn's `LogisticRegression(C=1 / l2)`) on feats as given."""
    feats = np.asarray(feats, np.float32)
    labels = np.asarray(labels)
    if feats.ndim != 2 or labels.shape != (len(feats),):
        raise UserError(f"need feats (num, dim) and labels (num,), got {feats.shape} and {labels.shape}")
    if l2 < 0 or steps <= 0:
        raise UserError(f"l2 must be >= 0 and steps > 0, got l2={l2}, steps={steps}")
    num_classes = int(num_classes if num_classes is not None else labels.max() + 1)
    params, count, grad_norm = _fit(
        jnp.asarray(feats),
        jnp.asarray(labels, jnp.int32),
        jnp.zeros((feats.shape[1], num_classes), jnp.float32),
        jnp.float32(l2 / len(feats)),
        jnp.int32(steps),
        jnp.float32(tol),
    )
    fit = LogReg(np.asarray(params["w"]), np.asarray(params["b"]), int(count), float(grad_norm))
    if fit.grad_norm >= tol:
        _log.warning("L-BFGS stopped after %d steps with gradient norm %.2e >= tol %.0e", fit.steps, fit.grad_norm, tol)
    return fit


def standardize(train_feats: np.ndarray, *others: np.ndarray, eps: float = 1e-12) -> tuple[np.ndarray, ...]:
    """Subtract the train mean and divide by the train std (1 where it is ~0), as `StandardScaler` does."""
    train_feats = np.asarray(train_feats, np.float64)
    mean, std = train_feats.mean(axis=0), train_feats.std(axis=0)
    std = np.where(std < eps, 1.0, std)
    return tuple(((np.asarray(f, np.float64) - mean) / std).astype(np.float32) for f in (train_feats, *others))


def linear_probe(
    train_feats: np.ndarray,
    train_labels: np.ndarray,
    test_feats: np.ndarray,
    test_labels: np.ndarray,
    l2: float = 1e-3,
    steps: int = 1000,
    tol: float = 1e-6,
    num_classes: int | None = None,
) -> dict[str, float]:
    """Standardize, fit `fit_logreg` on train, return {"top1": test accuracy, "train_top1": train accuracy}."""
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    train_x, test_x = standardize(train_feats, test_feats)
    model = fit_logreg(train_x, train_labels, l2=l2, num_classes=num_classes, steps=steps, tol=tol)
    return {
        "top1": float(np.mean(model.predict(test_x) == test_labels)),
        "train_top1": float(np.mean(model.predict(train_x) == train_labels)),
    }
