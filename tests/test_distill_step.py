"""The distillation step: sharding is invisible to the math; schedules follow docs/method.md."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import dgmr_jax as dj
from dgmr_jax.core.parallel import check_batch, host_batch_to_global, make_mesh, tree_shardings
from dgmr_jax.distill.loss import distill_loss, features, tap_config
from dgmr_jax.distill.step import make_step
from dgmr_jax.models.vit import logical_axes, param_shapes
from dgmr_jax.train.state import (
    OptimConfig,
    init_state,
    jit_step,
    lr_schedule,
    make_optimizer,
    state_shardings,
    wd_schedule,
)


def _models():
    teacher_cfg = dj.models.preset("vit_tiny_patch16_224", depth=2, img_size=32)
    teacher = dj.models.init_params(teacher_cfg, 0)
    student_cfg, student = dj.prune.prune_mlp(teacher_cfg, teacher, mlp_ratio=1.0)
    return teacher_cfg, teacher, student_cfg, student


def _train(mesh, steps=5, accum=1):
    teacher_cfg, teacher, student_cfg, student = _models()
    # eps 1e-6: the k part of the fused qkv bias has an exactly-zero gradient, so what reaches Adam there is
    # reduction-order noise (~1e-12) that eps 1e-8 would blow up to +-lr updates on one mesh and not another
    opt = OptimConfig(
        base_lr=1e-3,
        warmup_steps=2,
        total_steps=steps,
        global_batch=8,
        ema_decay=0.9,
        clip_norm=1.0,
        eps=1e-6,
        accum_steps=accum,
    )
    tx = make_optimizer(opt)
    state = init_state(student, tx, ema=True)
    state_sh = state_shardings(student_cfg, jax.eval_shape(lambda: state), mesh)
    teacher_sh = tree_shardings(logical_axes(teacher_cfg), param_shapes(teacher_cfg), mesh)
    state, teacher = jax.device_put(state, state_sh), jax.device_put(teacher, teacher_sh)
    step = jit_step(make_step(student_cfg, teacher_cfg, tx, opt), mesh, state_sh, teacher_sh)
    images = np.random.default_rng(0).normal(size=(steps, 8, 32, 32, 3)).astype(np.float32)
    losses = []
    for batch in images:
        state, metrics = step(state, teacher, host_batch_to_global(batch, mesh))
        losses.append(float(metrics["loss"]))
    return np.array(losses), jax.device_get(state)


def _rel(a, b):
    """max |a - b| / max |b| over the whole tree (the parity measure used throughout)."""
    pairs = list(zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))
    return max(float(np.abs(x - y).max()) for x, y in pairs) / max(float(np.abs(y).max()) for _, y in pairs)


@pytest.fixture(scope="module")
def one_device():
    return _train(make_mesh(1, 1, 1, devices=jax.devices()[:1]))


@pytest.mark.parametrize("shape", [(2, 4, 1), (4, 1, 2)])
@pytest.mark.slow
def test_same_steps_on_1_and_8_devices(one_device, shape):
    assert len(jax.devices()) == 8
    losses, state = _train(make_mesh(*shape))
    ref_losses, ref_state = one_device
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert losses[-1] < losses[0]
    assert _rel(state.params, ref_state.params) <= 1e-5
    assert _rel(state.ema, ref_state.ema) <= 1e-5


def test_schedules_follow_the_recipe():
    opt = OptimConfig(base_lr=6e-5, min_lr=1e-6, warmup_steps=10, total_steps=100, global_batch=512)
    lr, wd = lr_schedule(opt), wd_schedule(opt)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(6e-5 * 2 * 0.5)
    assert float(lr(10)) == pytest.approx(1.2e-4) and float(lr(100)) == pytest.approx(1e-6)
    assert (
        float(wd(0)) == pytest.approx(0.04)
        and float(wd(50)) == pytest.approx(0.12)
        and float(wd(100)) == pytest.approx(0.2)
    )


def test_loss_is_zero_for_the_teacher_itself_and_taps():
    teacher_cfg, teacher, _, _ = _models()
    x = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
    feats = features(teacher_cfg, teacher, x)
    loss, terms = distill_loss(feats, feats, 1.0, 1.0)
    assert float(loss) == 0.0
    raw_cfg = tap_config(teacher_cfg, "raw")
    pooled, patches = features(raw_cfg, teacher, x)
    assert pooled.shape == (2, 192) and patches.shape == (2, 4, 192)
    tokens = dj.models.forward(teacher_cfg.replace(final_norm=False), teacher, x)["tokens"]
    np.testing.assert_array_equal(pooled, tokens[:, 0])


@pytest.mark.slow
def test_gradient_accumulation_runs_and_bad_batches_fail_early():
    losses, state = _train(make_mesh(1, 1, 1, devices=jax.devices()[:1]), steps=4, accum=2)
    assert int(state.step) == 4 and np.isfinite(losses).all()
    with pytest.raises(ValueError, match="global batch 6 does not divide the data-parallel size data\\*fsdp=8"):
        check_batch(6, make_mesh(2, 4, 1))
    with pytest.raises(ValueError, match="needs 16 devices but 8 are available"):
        make_mesh(2, 8, 1)


@pytest.mark.slow
def test_undividable_dims_replicate_with_a_warning():
    cfg = dj.models.preset("vit_tiny_patch16_224", depth=1, img_size=32, width=100, num_heads=4, hidden=96)
    mesh = make_mesh(1, 8, 1)
    with pytest.warns(
        UserWarning, match="replicated instead of sharded: .*dim 100 \\(embed\\) not divisible by mesh axis fsdp=8"
    ):
        shardings = tree_shardings(logical_axes(cfg), param_shapes(cfg), mesh)
    assert shardings["blocks_0"]["mlp"]["fc1"]["kernel"].spec == jax.sharding.PartitionSpec(None, "tensor")
    params = jax.device_put(dj.models.init_params(cfg), shardings)  # places without error
    assert params["blocks_0"]["mlp"]["fc1"]["kernel"].shape == (100, 96)
