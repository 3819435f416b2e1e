"""Small PyTorch reference models (pretrained=False, seeded) and comparison helpers for the tests."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import dgmr_jax as dj  # noqa: E402

# timm name -> (image size, extra timm kwargs that shrink the giants)
TIMM_SMALL = {
    "vit_tiny_patch16_224": (32, {}),
    "deit_small_distilled_patch16_224": (32, {}),
    "vit_small_patch14_dinov2": (28, {}),
    "vit_small_patch14_reg4_dinov2": (28, {}),
    "vit_giant_patch14_dinov2": (28, dict(embed_dim=48, num_heads=4)),
    "eva02_small_patch14_224": (28, {}),
    "eva02_base_patch14_224": (28, dict(embed_dim=96, num_heads=4)),
    "eva_giant_patch14_clip_224": (28, dict(embed_dim=64, num_heads=4)),
    "eva02_enormous_patch14_clip_224": (28, dict(embed_dim=64, num_heads=4)),
}


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Overwrite every parameter with seeded noise so no zero-init bias or unit scale hides a bug."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model.eval()


def small_timm(name: str, depth: int = 2, seed: int = 0):
    """(torch model, matching ModelConfig, image size) for a shrunken timm architecture."""
    img, kw = TIMM_SMALL[name]
    model = randomize(timm.create_model(name, pretrained=False, img_size=img, depth=depth, **kw), seed)
    fields = dict(img_size=img, depth=depth)
    if kw:
        fields.update(width=kw["embed_dim"], num_heads=kw["num_heads"], hidden=model.blocks[0].mlp.fc2.in_features)
    return model, dj.models.preset(name, **fields), img


def images(img: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, img, img, generator=torch.Generator().manual_seed(seed))


def to_nhwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).numpy()


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref|."""
    ref = ref.detach().numpy() if hasattr(ref, "detach") else np.asarray(ref)
    return float(np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max())


def timm_outputs(model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        tokens = model.forward_features(x)
        out = {"tokens": tokens, "pooled": model.forward_head(tokens, pre_logits=True)}
        if model.num_classes:
            out["logits"] = model.forward_head(tokens)
    return out


def state_dict_numpy(model) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in model.state_dict().items()}
