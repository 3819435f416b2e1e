"""Storage faults under a distill run: gs:// killed and resumed, a store that stops answering or refuses
connections, a full disk: one line, exit 4, and a rerun that ends exactly where a clean run ends."""

from __future__ import annotations

import json
import re
import signal
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest
from distill_runs import STEPS, _assert_same, _command, _env, _final, _run, _seen, _wait_for, images, reference  # noqa: F401 (fixtures)
from gcs_emulator import gcs_emulator, gcs_objects

from dgmr_jax.core.paths import as_path
from dgmr_jax.model_dir import load_config, load_model

# every test runs the distill CLI in fresh processes (the module-scoped reference run alone takes minutes)
pytestmark = pytest.mark.slow


def _committed(env: dict[str, str]) -> list[int]:
    """Complete checkpoint steps of gs://dgmr-test/run (Orbax marks a finished step on GCS with commit_success.txt)."""
    names = gcs_objects(env, "dgmr-test", "run/checkpoints/")
    return [int(n.split("/")[2]) for n in names if n.count("/") == 3 and n.endswith("/commit_success.txt")]


@pytest.mark.emulator
def test_sigkill_and_resume_through_gs_equals_the_local_run(reference, images):
    """The same run with its workdir on Cloud Storage (a local emulator): killed mid-run, resumed, bit-identical
    to the uninterrupted local run, same images seen; its model directory on gs:// is the final state."""
    with gcs_emulator("dgmr-test") as env:
        workdir = "gs://dgmr-test/run"
        proc = subprocess.Popen(
            _command(workdir, images, "--config.async_checkpoint=true"),
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        _wait_for(lambda: any(step >= 8 for step in _committed(env)), proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert max(_committed(env)) < STEPS and not gcs_objects(env, "dgmr-test", "run/model/")
        _run(workdir, images)
        _assert_same(_final(workdir), _final(reference))
        assert _seen(workdir) == _seen(reference)
        assert load_config(f"{workdir}/model")[1]["distilled"]["step"] == STEPS
        _, params = load_model(f"{workdir}/model")
        for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(_final(reference)["params"]), strict=True):
            np.testing.assert_array_equal(x, y)
        metrics = (as_path(workdir) / "metrics.jsonl").read_text().splitlines()
        assert json.loads(metrics[-1])["step"] == STEPS
        assert any("/tensorboard/events.out.tfevents" in n for n in gcs_objects(env, "dgmr-test", "run/"))


_BAR = re.compile(r"distill:\s+\d+%\|")  # a progress-bar redraw: text mode turns its \r into a line break


def _error_line(stderr: str) -> str:
    """The one line a run that met a storage fault leaves on stderr, besides the progress bar (and the emulator's
    notice that TensorStore uses its test token)."""
    lines = [s for s in stderr.splitlines() if s.strip() and not _BAR.match(s) and "TOKEN_FOR_TESTING" not in s]
    assert "Traceback" not in stderr and len(lines) == 1, stderr[-3000:]
    return lines[0]


def _storage_fault(env: dict[str, str], images: Path, fault: signal.Signals, deadline: int) -> tuple[int, str]:
    """(exit code, error line) of a gs:// run whose storage gets `fault` (SIGSTOP: it stops answering; SIGKILL:
    it refuses connections) once checkpoint 8 is complete; a run still going `deadline` + 120 s later fails."""
    command = _command("gs://dgmr-test/run", images, "--config.async_checkpoint=true")
    proc = subprocess.Popen(
        [*command, f"--config.storage_timeout_s={deadline}"],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(lambda: any(step >= 8 for step in _committed(env)), proc)
        env.process.send_signal(fault)
        _, err = proc.communicate(timeout=deadline + 120)
    finally:
        proc.kill()  # only if it hung
    return proc.returncode, _error_line(err)


@pytest.mark.emulator
def test_storage_that_stops_answering_ends_the_run_in_one_line_and_the_rerun_is_exact(reference, images):
    """The bucket stops answering mid-run (the emulator SIGSTOPped): the run ends once a storage call has waited
    --config.storage_timeout_s, exit 4, one line naming the workdir and the last complete checkpoint; with the
    bucket back, the same command resumes and ends bit-identical to the uninterrupted run, same images seen."""
    with gcs_emulator("dgmr-test") as env:
        try:
            code, line = _storage_fault(env, images, signal.SIGSTOP, deadline=20)
        finally:
            env.process.send_signal(signal.SIGCONT)
        assert code == 4
        match = re.fullmatch(
            r"dgmr-jax: error: storage at gs://dgmr-test/run did not answer for 20 s \(.+\); checkpoints up to "
            r"step (\d+) are complete there(?:, step (\d+) may be too)?: rerun the same command to resume once it "
            r"answers \(if it is only slow, raise --config.storage_timeout_s\)",
            line,
        )
        assert match, line
        committed = _committed(env)  # the line names the newest complete step, as complete or as maybe complete
        assert int(match[1]) in committed and max(committed) in {int(n) for n in match.groups() if n}, line
        _run("gs://dgmr-test/run", images)
        _assert_same(_final("gs://dgmr-test/run"), _final(reference))
        assert _seen("gs://dgmr-test/run") == _seen(reference)


@pytest.mark.emulator
def test_storage_that_refuses_connections_ends_the_run_in_one_line(images):
    """The bucket's endpoint refuses connections mid-run (the emulator killed): exit 4 and one line within the
    deadline, with the client's error if its retries end first; no stall of minutes, no traceback."""
    with gcs_emulator("dgmr-test") as env:
        code, line = _storage_fault(env, images, signal.SIGKILL, deadline=20)
    assert code == 4
    assert re.fullmatch(
        r"dgmr-jax: error: storage at gs://dgmr-test/run (failed \(.+\): .*Connect.*|did not answer for 20 s \(.+\)); "
        r"checkpoints up to step \d+ are complete there(, step \d+ may be too)?: rerun the same command to resume "
        r"once it (is reachable|answers \(if it is only slow, raise --config.storage_timeout_s\))",
        line,
    ), line


def test_a_full_disk_ends_the_run_in_one_line_and_the_rerun_is_exact(reference, images, tmp_path):
    """A workdir on a disk that fills at the second checkpoint (a 12 MB tmpfs; a checkpoint here is 7 MB): exit 4,
    one line naming the workdir and the last complete checkpoint, no thread tracebacks; with space freed, the same
    command resumes and ends bit-identical to the uninterrupted run."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("the full disk is a small tmpfs: mounting it needs root")
    try:
        workdir = disk / "run"
        command = _command(workdir, images, "--config.async_checkpoint=true")
        done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
        assert done.returncode == 4
        line = _error_line(done.stderr)
        match = re.fullmatch(
            rf"dgmr-jax: error: no space left on the storage of {re.escape(str(workdir))} \(.+\); checkpoints up "
            r"to step (\d+) are complete there(?:, step (\d+) may be too)?: free space and rerun the same command to "
            r"resume",
            line,
        )
        complete = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
        assert match and int(match[1]) in complete and max(complete) in {int(n) for n in match.groups() if n}, line
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        _run(workdir, images)
        _assert_same(_final(workdir), _final(reference))
        assert _seen(workdir) == _seen(reference)
    finally:
        subprocess.run(["umount", str(disk)], check=True)
