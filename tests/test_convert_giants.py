"""Giant presets: the Flax tree (built abstractly) matches the reference state dict key for key."""

from __future__ import annotations

import pytest
from reference import assert_same_tree, meta_state_dict, timm

import dgmr_jax as dj

# giant configs built abstractly beside timm/open_clip meta models (seconds each)
pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "name,billions",
    [
        ("eva02_enormous_patch14_clip_224", 4.3506),
        ("vit_giant_patch14_dinov2", 1.1365),
        ("eva_giant_patch14_clip_224", 1.0126),
    ],
)
def test_timm_giants_key_for_key(name, billions):
    ref, count = meta_state_dict(lambda: timm.create_model(name, pretrained=False))
    cfg = dj.models.preset(name)
    assert_same_tree(cfg, "timm", ref)
    ours = dj.prune.count_params(cfg)
    assert ours == count
    assert round(ours / 1e9, 4) == billions


def test_open_clip_vit_g_14_key_for_key():
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import _build_vision_tower

    model_cfg = open_clip.get_model_config("ViT-g-14")
    ref, count = meta_state_dict(lambda: _build_vision_tower(model_cfg["embed_dim"], model_cfg["vision_cfg"]))
    cfg = dj.models.preset("ViT-g-14")
    assert_same_tree(cfg, "open_clip", ref)
    assert dj.prune.count_params(cfg) == count
    assert round(count / 1e9, 4) == 1.0126
