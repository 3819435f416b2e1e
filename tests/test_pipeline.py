"""The README's command blocks, verbatim: the pipeline on a tiny timm model (convert -> prune -> distill -> export
-> eval), and the one-line text stage on the demo's image tower and the digits.

The distilled student that `distill` writes must be what `export` hands to PyTorch: the exported state dict
loads strictly into timm and reproduces our forward of the distilled params.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest
from reference import images, rel_err, timm, timm_outputs, to_nhwc, torch

import dgmr_jax as dj
from dgmr_jax.io.checkpoint_io import save_safetensors
from dgmr_jax.io.text_convert import text_from_torch
from dgmr_jax.model_dir import load_config, load_model

ROOT = Path(__file__).resolve().parents[1]

# the README's command blocks: convert, prune, distill, export, eval; finetune-text (minutes on a 2-core host)
pytestmark = pytest.mark.slow


def readme_commands(marker: str) -> list[list[str]]:
    """The arguments of each indented `dgmr-jax` line of the README block marked <!-- marker -->."""
    text = (ROOT / "README.md").read_text()
    block = text.split(f"<!-- {marker} -->\n", 1)[1].split("\n\n", 1)[0]
    lines = [line.strip() for line in block.splitlines()]
    assert lines and all(re.match(r"dgmr-jax \w", line) for line in lines), block
    return [shlex.split(line)[1:] for line in lines]


def _user_env() -> dict[str, str]:
    """The environment a user's shell has: none of conftest's settings (8 fake devices, JAX_PLATFORMS, the
    torchvision shim, which lives in this process only)."""
    return {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS") and "PYTEST" not in k}


def _as_a_user(argv: list[str]) -> str:
    """Run `dgmr-jax ARGV` as a user does (the installed console script, its own process, a user's environment);
    its stdout. It must succeed with no traceback and no libtpu start-up noise."""
    entry = shutil.which("dgmr-jax")
    assert entry, "the dgmr-jax console script is not on PATH: pip install -e . first"
    done = subprocess.run([entry, *argv], env=_user_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (argv, done.stderr[-2000:])
    assert "libtpu" not in done.stderr.lower() and "Traceback" not in done.stderr, done.stderr[-2000:]
    return done.stdout


def test_readme_sequence_runs_verbatim_and_exports_the_distilled_student(tmp_path, monkeypatch):
    """Each README line runs as a user runs it: the installed `dgmr-jax` in its own process, from a directory
    outside the checkout."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64).eval()
    save_safetensors(tmp_path / "vit_tiny.safetensors", {k: v.numpy() for k, v in model.state_dict().items()})
    monkeypatch.chdir(tmp_path)  # away from the checkout: `--config cpu_tiny` is the shipped recipe
    commands = readme_commands("pipeline")
    assert [c[0] for c in commands] == ["convert", "prune", "distill", "export", "eval"]
    out = "".join(_as_a_user(argv) for argv in commands)
    assert "model directory" in out and "kNN top-1" in out
    # the in-loop kNN of the last step is what `eval` printed for the exported student
    rows = [json.loads(line) for line in Path("runs/vit_tiny_prune1/metrics.jsonl").read_text().splitlines()]
    evaluated = [r for r in rows if "eval/knn/knn@20" in r]
    assert [r["step"] for r in evaluated] == [6, 12]
    printed = ", ".join(f"k={k}: {evaluated[-1][f'eval/knn/knn@{k}']:.4f}" for k in (10, 20, 100, 200))
    assert f"kNN top-1 ({printed})" in out

    cfg, distilled = load_model("runs/vit_tiny_prune1/model")
    _, pruned = load_model("vit_tiny_prune1")
    meta = load_config("runs/vit_tiny_prune1/model")[1]
    assert meta["distilled"]["step"] == 12 and meta["pruned"]["method"] == "diversity"
    # timm's AugReg ViT-Ti weights take [-1, 1] inputs: the published settings, carried from convert to the student
    assert meta["preprocess"] == {
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "img_size": 64,
    }
    pairs = zip(jax.tree.leaves(distilled), jax.tree.leaves(pruned), strict=True)
    # every tensor that is not all zeros (the unused head's bias stays zero) was trained: the distilled student
    assert all(not np.array_equal(a, b) for a, b in pairs if np.any(b))

    slim = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64)
    for block, width in zip(slim.blocks, cfg.mlp_hidden, strict=True):
        block.mlp = timm.layers.Mlp(cfg.width, width)
    from safetensors.torch import load_file

    slim.load_state_dict(load_file("vit_tiny_prune1.safetensors"))  # strict
    slim.eval()
    x = images(64)
    ours = dj.models.forward(cfg, distilled, to_nhwc(x))
    with torch.no_grad():
        for key, ref in timm_outputs(slim, x).items():
            assert rel_err(ours[key], ref) <= 1e-5, key
    assert json.loads(Path("runs/vit_tiny_prune1/run.json").read_text())["signature"]["data"].startswith("Mnist5k")


def test_readme_text_stage_runs_verbatim_and_teaches_the_text_tower_the_digits(tmp_path, monkeypatch):
    """The README's one-line text stage: a small random-init text tower against the demo's frozen DINOv2 tower, on
    the training digits captioned with their zero-shot prompts. Zero-shot top-1 on the 1,000 held-out digits starts
    at chance and ends above 0.5; the tower is exported with the config it was given."""
    monkeypatch.chdir(tmp_path)  # away from the checkout: the recipe and the text preset ship in the package
    (argv,) = readme_commands("finetune-text")
    assert argv[0] == "finetune-text"
    out = _as_a_user(argv)
    summary = json.loads(Path("runs/text_quick/summary.json").read_text())
    start, end = summary["eval_start"]["eval/zeroshot/top1"], summary["eval_end"]["eval/zeroshot/top1"]
    assert start < 0.2 < 0.5 < end, (start, end)
    assert f"zeroshot/top1 {start:.4f}" in out.splitlines()[-3] and f"zeroshot/top1 {end:.4f}" in out.splitlines()[-2]
    assert summary["step"] == 100 and summary["pairs"] == {
        "spec": "mnist5k",
        "images": 4000,
        "captions": 8000,
        "bad": 0,
        "bad_examples": [],
    }
    text = Path("runs/text_quick/text")
    assert json.loads((text / "export.json").read_text())["clip_text"] == "random init of tiny-384 (seed 0)"
    given = dj.models.text.TRY_TEXT_PRESETS["tiny-384"]
    written = json.loads((text / "text_config.json").read_text())
    assert {k: written[k] for k in given} == given
    # the exported file is that tower, whole: it loads strictly with the config written beside it
    cfg, params = text_from_torch(str(text / "text.safetensors"), str(text / "text_config.json"))
    assert cfg.embed_dim == 384 and params["proj"]["kernel"].shape == (128, 384)
