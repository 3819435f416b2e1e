"""Taylor importance: the gradient at the fc2 input is the true derivative of the loss."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import dgmr_jax as dj
from dgmr_jax.prune.taylor import feature_energy, hidden_and_grads, taylor_scores

# both tests train and compile gradients of small ViTs (>5 s each on a 2-core host)
pytestmark = pytest.mark.slow


def test_activation_times_gradient_is_the_derivative_of_scaling_a_neuron():
    with jax.enable_x64(True):  # float64 so the finite difference is not rounding noise
        _check_derivative()


def _check_derivative():
    cfg = dj.models.preset("vit_tiny_patch16_224", depth=2, img_size=32, dtype="float64", param_dtype="float64")
    params = dj.models.init_params(cfg, 0)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3))
    h, g = hidden_and_grads(cfg, params, x)["blocks_1"]
    neuron, eps = 7, 1e-4

    # scaling neuron i's fc2 row by (1 + e) scales its activation by (1 + e): dL/de = sum over tokens h_i g_i
    def loss_with(scale):
        kernel = np.array(params["blocks_1"]["mlp"]["fc2"]["kernel"])
        kernel[neuron] *= scale
        p = {
            **params,
            "blocks_1": {
                **params["blocks_1"],
                "mlp": {**params["blocks_1"]["mlp"], "fc2": {**params["blocks_1"]["mlp"]["fc2"], "kernel": kernel}},
            },
        }
        return float(feature_energy(dj.models.forward(cfg, p, x)))

    numeric = (loss_with(1 + eps) - loss_with(1 - eps)) / (2 * eps)
    analytic = float(np.sum(np.asarray(h)[..., neuron] * np.asarray(g)[..., neuron]))
    assert analytic != 0 and analytic == pytest.approx(numeric, rel=1e-4)


def test_taylor_method_prunes_to_the_highest_scores():
    cfg = dj.models.preset("vit_tiny_patch16_224", depth=2, img_size=32)
    params = dj.models.init_params(cfg, 0)
    x = np.random.default_rng(1).normal(size=(4, 32, 32, 3)).astype(np.float32)
    scores = taylor_scores(cfg, params, [x[:2], x[2:]])
    assert [s.shape for s in scores] == [(768,), (768,)] and all(np.all(s >= 0) for s in scores)
    new_cfg, new = dj.prune.prune_mlp(cfg, params, method="taylor", hidden=10, scores=scores)
    top = np.sort(np.argsort(-scores[0], kind="stable")[:10])
    np.testing.assert_array_equal(
        new["blocks_0"]["mlp"]["fc1"]["kernel"], params["blocks_0"]["mlp"]["fc1"]["kernel"][:, top]
    )
    with pytest.raises(ValueError, match="at least one batch"):
        taylor_scores(cfg, params, [])
