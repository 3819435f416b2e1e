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
