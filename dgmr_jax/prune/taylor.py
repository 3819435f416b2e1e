"""Taylor importance of MLP neurons: mean over data of |activation x gradient| at the fc2 input.

The gradient is that of a scalar loss of the model's outputs. With the distillation loss against the
unpruned teacher that loss is identically zero at the start (student == teacher), so the default is
the distillation loss against a zero target, i.e. the energy of the distilled features: neuron i
scores high when removing it would change the pooled vector and patch tokens the most (first order).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dgmr_jax.core.errors import UserError
from dgmr_jax.data import EvalBatches, open_images
from dgmr_jax.models.config import ModelConfig
from dgmr_jax.models.preprocess import Preprocess
from dgmr_jax.models.tree import Params, is_scanned, unstack_blocks
from dgmr_jax.models.vit import VisionTransformer

Loss = Callable[[dict[str, jax.Array]], jax.Array]


def feature_energy(out: dict[str, jax.Array]) -> jax.Array:
    """0.5 * MSE(pooled, 0) + 0.5 * MSE(tokens, 0): the DGMR feature loss against a zero target."""
    return 0.5 * jnp.mean(jnp.square(out["pooled"])) + 0.5 * jnp.mean(jnp.square(out["tokens"]))


def hidden_and_grads(
    cfg: ModelConfig, params: Params, images: jax.Array, loss_fn: Loss = feature_energy
) -> dict[str, tuple[jax.Array, jax.Array]]:
    """Per block: (fc2 input h of shape (B, N, H), dloss/dh), from one forward and one backward pass."""
    model = VisionTransformer(cfg)
    _, state = model.apply({"params": params}, images, mutable=["intermediates"])
    hidden = {k: v["mlp"]["hidden"][0] for k, v in state["intermediates"].items()}
    zeros = {k: {"mlp": {"hidden": jnp.zeros_like(v)}} for k, v in hidden.items()}

    def loss(perturbations):
        return loss_fn(model.apply({"params": params, "perturbations": perturbations}, images))

    grads = jax.grad(loss)(zeros)
    return {k: (v, grads[k]["mlp"]["hidden"]) for k, v in hidden.items()}


def taylor_scores(
    cfg: ModelConfig, params: Params, batches: Iterable[Any], loss_fn: Loss = feature_energy
) -> list[np.ndarray]:
    """One (H_l,) importance array per layer, averaged over every token of every image in `batches`."""
    cfg = cfg.replace(scan_layers=False)
    params = unstack_blocks(params) if is_scanned(params) else params

    @jax.jit
    def step(images):
        pairs = hidden_and_grads(cfg, params, images, loss_fn)
        return {k: jnp.abs(h * g).sum(axis=(0, 1)) for k, (h, g) in pairs.items()}

    totals, count = None, 0
    for images in batches:
        images = jnp.asarray(images)
        sums = step(images)
        totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
        count += images.shape[0] * (
            cfg.num_prefix_tokens + (images.shape[1] // cfg.patch_size) * (images.shape[2] // cfg.patch_size)
        )
    if totals is None:
        raise UserError("taylor_scores needs at least one batch of images")
    return [np.asarray(totals[f"blocks_{i}"]) / count for i in range(cfg.depth)]


def taylor_scores_on_images(model: Any, spec: str, num_images: int, batch: int) -> list[np.ndarray]:
    """Per-layer Taylor importance of an opened model's (io.open_model) MLP neurons over the first `num_images`
    readable images of the image set `spec` (its train split), in the model's eval view at its image size."""
    data = open_images(spec, split="train").source
    size = model.cfg.img_size
    view = Preprocess.from_meta(model.meta, model.cfg.name).eval_view(size)
    batches = EvalBatches(data, batch_size=batch, img_size=size, **view)
    images = (b["images"] for b in itertools.islice(batches, -(-num_images // batch)))
    print(f"taylor: scoring neurons on {min(num_images, len(data))} images of {spec} (whole model in memory)")
    return taylor_scores(model.cfg, model.load(), images)
