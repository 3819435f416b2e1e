"""Small PyTorch reference models (pretrained=False, seeded) and comparison helpers for the tests."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import dgmr_jax as dj  # noqa: E402
from dgmr_jax.io.hooks import HOOKS  # noqa: E402
from dgmr_jax.io.keymaps import rules  # noqa: E402
from dgmr_jax.io.model_dir import COMPLETE_FILE  # noqa: E402
from dgmr_jax.models.tree import flatten  # noqa: E402

# timm name -> (image size, extra timm kwargs that shrink the giants)
TIMM_SMALL = {
    "vit_tiny_patch16_224": (32, {}),
    "deit_small_distilled_patch16_224": (32, {}),
    "vit_base_patch16_clip_224": (32, dict(embed_dim=64, num_heads=4)),
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


def small_timm(name: str, depth: int = 2, seed: int = 0, num_classes: int | None = None):
    """(torch model, matching ModelConfig, image size) for a shrunken timm architecture (num_classes: its own head,
    else the architecture's)."""
    img, kw = TIMM_SMALL[name]
    head = {} if num_classes is None else dict(num_classes=num_classes)
    model = randomize(timm.create_model(name, pretrained=False, img_size=img, depth=depth, **kw, **head), seed)
    fields = dict(img_size=img, depth=depth, **head)
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


def small_clip(activation: str = "gelu", custom_text: bool = False, seed: int = 0, depth: int = 2):
    """(open_clip CLIP with 64-wide towers (the image tower `depth` layers deep, the text tower 2) and a 32-d joint
    embedding, its vision ModelConfig, its TextConfig); custom_text builds CustomTextCLIP, whose text tower sits
    under "text." (EVA02-E-14-plus)."""
    open_clip = pytest.importorskip("open_clip")
    vision = dict(image_size=32, patch_size=16, width=64, layers=depth, head_width=32)
    text = dict(width=64, heads=2, layers=2)
    kind = open_clip.model.CustomTextCLIP if custom_text else open_clip.model.CLIP
    model = randomize(kind(32, vision, text, quick_gelu=activation == "quick_gelu"), seed)
    vision_cfg = dj.models.preset(
        "ViT-B-32",
        depth=depth,
        img_size=32,
        patch_size=16,
        width=64,
        num_heads=2,
        hidden=256,
        proj_dim=32,
        mlp_type=activation,
    )
    text_cfg = dj.models.TextConfig(name="tiny", width=64, heads=2, layers=2, embed_dim=32, activation=activation)
    return model, vision_cfg, text_cfg


def meta_state_dict(build) -> tuple[dict[str, tuple[int, ...]], int]:
    """({name: shape}, parameter count) of the module build() makes on torch's meta device (no memory)."""
    with torch.device("meta"):
        module = build()
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}, sum(p.numel() for p in module.parameters())


def assert_same_tree(cfg, family: str, ref_shapes: dict) -> None:
    """The family's rules for cfg cover exactly ref_shapes' names and the Flax tree, shapes matching through
    every hook (converted on stand-ins of a zero-byte dtype, so even an 18B tower allocates nothing)."""
    shapes = flatten(dj.models.param_shapes(cfg))
    table = rules(cfg, family)
    assert {k for r in table for k in r.torch} == set(ref_shapes)
    assert {p for r in table for p in r.flax} == set(shapes)
    for rule in table:
        fakes = [np.empty(ref_shapes[k], np.dtype([])) for k in rule.torch]
        for path, value in zip(rule.flax, HOOKS[rule.hook][0](fakes), strict=True):
            assert value.shape == tuple(shapes[path].shape), (rule, value.shape, shapes[path].shape)


def converted_small_clip(root, seed: int = 3):
    """small_clip(seed) saved as root/clip.pt with root/vision.json and root/text.json, its vision tower
    converted by `dgmr-jax convert` to the model directory root/model; returns the open_clip model."""
    from dgmr_jax.cli import main

    model, vision_cfg, text_cfg = small_clip(seed=seed)
    torch.save(model.state_dict(), root / "clip.pt")
    (root / "vision.json").write_text(vision_cfg.to_json())
    (root / "text.json").write_text(text_cfg.to_json())
    convert = ["convert", "--family", "open_clip", "--arch", str(root / "vision.json")]
    assert main([*convert, "--checkpoint", str(root / "clip.pt"), "--out", str(root / "model")]) == 0
    return model


def config_only_model(folder, cfg, **meta) -> None:
    """A model directory holding its config.json alone, complete as far as readers can tell: a command that must
    refuse it from the config alone fails differently if it reads a weight."""
    folder.mkdir()
    config = json.dumps({"config": json.loads(cfg.to_json()), "meta": meta})
    (folder / "config.json").write_text(config)
    (folder / COMPLETE_FILE).write_text(json.dumps({"files": {"config.json": len(config.encode())}}))


def random_png_folder(root, n: int = 16, size: int = 36, seed: int = 0):
    """`root` filled with n random RGB PNGs of size x size (0.png ...): a tiny unlabeled image folder for runs."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")).save(root / f"{i}.png")
    return root


def class_png_folders(root, names, shape: tuple[int, int] = (40, 36), std: float = 40, seed: int = 0):
    """root/NAME/0..2.png for each class name: noisy RGB PNGs (height, width = shape) whose brightness grows with
    the class index, so that even a tiny random model can tell the classes apart now and then."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for i in range(3):
            pixels = np.clip(rng.normal(60 + 70 * c, std, (*shape, 3)), 0, 255).astype("uint8")
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def package_modeling(folder: Path):
    """The modeling.py of an `export --format torch` package, imported from its folder (it needs only torch)."""
    spec = importlib.util.spec_from_file_location(f"modeling_{folder.name}", folder / "modeling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
