"""Giant presets: the Flax tree (built abstractly) matches the reference state dict key for key."""

from __future__ import annotations

import pytest
from reference import timm, torch

import dgmr_jax as dj
from dgmr_jax.convert.hooks import HOOKS
from dgmr_jax.convert.keymaps import rules
from dgmr_jax.models.tree import flatten


def _meta_state_dict(build):
    with torch.device("meta"):
        module = build()
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}, sum(p.numel() for p in module.parameters())


def _assert_same_tree(cfg, family: str, ref_shapes: dict) -> None:
    shapes = flatten(dj.models.param_shapes(cfg))
    table = rules(cfg, family)
    assert {k for r in table for k in r.torch} == set(ref_shapes)
    assert {p for r in table for p in r.flax} == set(shapes)
    for rule in table:  # convert zero-size stand-ins: shapes must line up through every hook
        import numpy as np

        fakes = [np.empty(ref_shapes[k], np.float32) for k in rule.torch]
        for path, value in zip(rule.flax, HOOKS[rule.hook][0](fakes), strict=True):
            assert value.shape == tuple(shapes[path].shape), (rule, value.shape, shapes[path].shape)


@pytest.mark.parametrize(
    "name,billions",
    [
        ("eva02_enormous_patch14_clip_224", 4.3506),
        ("vit_giant_patch14_dinov2", 1.1365),
        ("eva_giant_patch14_clip_224", 1.0126),
    ],
)
def test_timm_giants_key_for_key(name, billions):
    ref, count = _meta_state_dict(lambda: timm.create_model(name, pretrained=False))
    cfg = dj.models.preset(name)
    _assert_same_tree(cfg, "timm", ref)
    ours = dj.prune.count_params(cfg)
    assert ours == count
    assert round(ours / 1e9, 4) == billions


def test_open_clip_vit_g_14_key_for_key():
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import _build_vision_tower

    model_cfg = open_clip.get_model_config("ViT-g-14")
    ref, count = _meta_state_dict(lambda: _build_vision_tower(model_cfg["embed_dim"], model_cfg["vision_cfg"]))
    cfg = dj.models.preset("ViT-g-14")
    _assert_same_tree(cfg, "open_clip", ref)
    assert dj.prune.count_params(cfg) == count
    assert round(count / 1e9, 4) == 1.0126
