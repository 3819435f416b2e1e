"""The command line's two entries: main(argv) only parses and dispatches; the `dgmr-jax` script and
`python -m dgmr_jax.cli` go through run(), the one place with process-wide set-up."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from dgmr_jax import cli

ROOT = Path(__file__).resolve().parents[1]


def test_console_script_is_the_process_entry():
    scripts = re.search(r"\[project\.scripts\]\n(.*?)\n\n", (ROOT / "pyproject.toml").read_text(), re.S).group(1)
    assert scripts == 'dgmr-jax = "dgmr_jax.cli:run"'
    assert '\nif __name__ == "__main__":\n    run()\n' in (ROOT / "dgmr_jax" / "cli.py").read_text()


def test_main_changes_nothing_process_wide_and_run_prepares_then_dispatches(tmp_path, monkeypatch, capsys):
    prepared = []
    monkeypatch.setattr(cli, "prepare_process", lambda args: prepared.append(args.command))
    argv = ["distill", "--workdir", str(tmp_path)]  # fails fast: no --config
    assert cli.main(argv) == 2 and prepared == []
    main_err = capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["dgmr-jax", *argv])
    with pytest.raises(SystemExit) as exit_:
        cli.run()
    assert exit_.value.code == 2 and prepared == ["distill"]
    assert capsys.readouterr().err == main_err  # the same parsing and dispatch


def test_prepare_process_keeps_host_memory_for_compute_commands_only(monkeypatch):
    import dgmr_jax.core.hostmem as hostmem

    calls = []
    monkeypatch.setattr(hostmem, "keep_freed_host_memory", lambda: calls.append(1))
    cli.prepare_process(cli.parse(["export", "--model", "m", "--out", "o.pth"]))
    assert calls == []
    cli.prepare_process(cli.parse(["eval", "--model", "m"]))
    assert calls == [1]


def test_bad_input_is_one_line_but_a_bug_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    """UserError (and missing/existing paths) print one line with exit 2; a ValueError from inside the code, such
    as a shape error, is a bug: it propagates with its traceback instead of posing as bad input."""
    import dgmr_jax.io.open as opener
    from dgmr_jax.core.errors import UserError

    argv = [
        "convert",
        "--checkpoint",
        str(tmp_path / "x.pth"),
        "--arch",
        "vit_tiny_patch16_224",
        "--out",
        str(tmp_path / "out"),
    ]
    monkeypatch.setattr(opener, "open_model", lambda *a, **k: (_ for _ in ()).throw(UserError("bad input here")))
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == "dgmr-jax convert: error: bad input here\n"
    shape_bug = ValueError("operands could not be broadcast together with shapes (3,) (4,)")
    monkeypatch.setattr(opener, "open_model", lambda *a, **k: (_ for _ in ()).throw(shape_bug))
    with pytest.raises(ValueError, match="could not be broadcast"):
        cli.main(argv)


def test_without_a_tpu_jax_is_kept_from_starting_libtpu_but_keeps_gpus(monkeypatch):
    """Which platforms `run` gives JAX: cpu on a host without accelerators; cuda,cpu on an NVIDIA host with JAX's
    CUDA plugin; JAX's own choice on a TPU host, without the plugin, without libtpu or with JAX_PLATFORMS set."""
    import fnmatch
    import glob
    import importlib.metadata
    import importlib.util
    import os

    files: set[str] = set()
    plugins: list[str] = []
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())  # libtpu installed
    monkeypatch.setattr(os.path, "exists", lambda path: path in files)
    monkeypatch.setattr(glob, "glob", lambda pattern: fnmatch.filter(files, pattern))
    monkeypatch.setattr(
        importlib.metadata, "entry_points", lambda group: [type("E", (), {"value": v}) for v in plugins]
    )
    assert cli._platforms_without_tpu() == "cpu"
    files.add("/dev/nvidiactl")
    assert cli._platforms_without_tpu() is None  # a GPU JAX has no plugin for: not hidden behind cpu
    plugins.append("jax_plugins.xla_cuda12")  # as jax-cuda12-pjrt advertises it
    assert cli._platforms_without_tpu() == "cuda,cpu"
    files.add("/dev/vfio/0")
    assert cli._platforms_without_tpu() is None  # a TPU host
    files.clear()
    monkeypatch.setenv("JAX_PLATFORMS", "")
    assert cli._platforms_without_tpu() is None
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # no libtpu installed
    assert cli._platforms_without_tpu() is None


@pytest.mark.slow
def test_commands_print_no_libtpu_start_up_errors_on_a_host_without_a_tpu(tmp_path):
    """With libtpu installed (.[test], .[tpu-plan]) and JAX_PLATFORMS unset, a real command (it starts JAX's
    backends) writes its file and prints nothing about TPUs; libtpu alone would print about six lines."""
    import glob
    import os
    import subprocess

    pytest.importorskip("libtpu")
    if any(glob.glob(pattern) for pattern in cli._TPU_FILES):
        pytest.skip("a TPU host: JAX starts libtpu there, as it should")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    argv = ["export", "--model", "preset:vit_tiny_patch16_224", "--out", "tiny.safetensors"]
    run = subprocess.run(
        [sys.executable, "-m", "dgmr_jax.cli", *argv], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("wrote tiny.safetensors: 152 tensors in the timm layout")
    assert "TPU" not in run.stderr and "libtpu" not in run.stderr, run.stderr


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    """Ctrl-C outside a train loop (loading, compiling) prints one line, exit 130; a run that saved its step
    first (Interrupted) says which."""
    import dgmr_jax.io.open as opener
    from dgmr_jax.core.errors import Interrupted

    argv = ["convert", "--checkpoint", str(tmp_path / "x.pth"), "--arch", "vit_tiny_patch16_224"]
    argv += ["--out", str(tmp_path / "out")]
    for raised, line in [
        (KeyboardInterrupt(), "interrupted (Ctrl-C)"),
        (
            Interrupted("interrupted (Ctrl-C): saved step 7 and stopped"),
            "interrupted (Ctrl-C): saved step 7 and stopped",
        ),
    ]:
        monkeypatch.setattr(opener, "open_model", lambda *a, raised=raised, **k: (_ for _ in ()).throw(raised))
        assert cli.main(argv) == 130
        assert capsys.readouterr().err == f"dgmr-jax convert: {line}\n"
