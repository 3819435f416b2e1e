"""Every command that writes checks first that it can: an output it cannot create fails in one line that names
the path, before any model is read or any layer pruned, and nothing is written."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

import dgmr_jax as dj
from dgmr_jax.cli import main
from dgmr_jax.model_dir import save_model

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "cpu_tiny.py")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A random-init 2-layer ViT-Ti model directory at 32 px and a folder of 16 noise images."""
    root = tmp_path_factory.mktemp("inputs")
    cfg = dj.models.preset("vit_tiny_patch16_224", depth=2, img_size=32)
    save_model(root / "model", cfg, jax.device_get(dj.models.init_params(cfg, 0)), family="timm")
    (root / "imgs").mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray((rng.random((36, 36, 3)) * 255).astype("uint8")).save(root / "imgs" / f"{i}.png")
    return root


def _case(command: str, inputs: Path, blocker: Path, tmp: Path) -> tuple[list[str], str, Path]:
    """(the command line, the name its message gives the output, the output): an output inside `blocker`."""
    model, imgs = str(inputs / "model"), str(inputs / "imgs")
    uvc = ["uvc", "--model", model, "--flops-budget", "0.5", "--train", imgs, "--steps", "2", "--config", CONFIG]
    distill = ["distill", "--config", CONFIG, f"--config.data.path={imgs}", "--config.teacher.random_init=true"]
    directory, file, json_file = blocker / "out", blocker / "out.safetensors", blocker / "out.json"
    argv, flag, bad = {
        # convert reads its checkpoint only after the check: this one does not even exist
        "convert": (
            ["convert", "--arch", "vit_tiny_patch16_224", "--checkpoint", str(tmp / "x.pth")],
            "output",
            directory,
        ),
        "prune": (["prune", "--model", model, "--mlp-ratio", "0.5"], "output", directory),
        "export": (["export", "--model", model], "--out", file),
        "eval": (["eval", "--model", model, "--train", imgs, "--test", imgs], "--out", json_file),
        "plan": (["plan", "--config", CONFIG, "--devices", "1"], "--out", json_file),
        "uvc --out": ([*uvc, "--workdir", str(tmp / "w")], "output", directory),
        "uvc --workdir": ([*uvc, "--out", str(tmp / "slim")], "--workdir", directory),
        "distill --workdir": (distill, "--workdir", directory),
    }[command]
    return [*argv, "--out" if flag == "output" else flag, str(bad)], flag, bad


@pytest.mark.slow
@pytest.mark.parametrize(
    "command", ["convert", "prune", "export", "eval", "plan", "uvc --out", "uvc --workdir", "distill --workdir"]
)
def test_output_under_a_file_fails_first_in_one_line(inputs, tmp_path, command):
    """An output inside a regular file can be made by no one, root included (chmod does not stop root)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    argv, flag, bad = _case(command, inputs, blocker, tmp_path)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-m", "dgmr_jax.cli", *argv], capture_output=True, text=True, env=env)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr == (
        f"dgmr-jax {argv[0]}: error: {flag} {bad} cannot be written: {blocker} is not a folder; choose another {flag}\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # nothing written, no work directory either


def test_folder_that_refuses_files_fails_in_one_line(inputs, tmp_path, monkeypatch, capsys):
    """A read-only folder: the probe file is refused (as root, whom chmod does not stop, a stub refuses it)."""
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    if os.geteuid() == 0:

        def refuse(*args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied")

        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    out = read_only / "small"
    assert main(["prune", "--model", str(inputs / "model"), "--mlp-ratio", "0.5", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"dgmr-jax prune: error: output {out} cannot be written (Permission denied in {read_only}); choose another "
        "output or make that folder writable\n"
    )
    assert list(read_only.iterdir()) == []
