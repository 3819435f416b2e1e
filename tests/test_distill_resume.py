"""Preemption and multi-host: interrupted or split runs end with exactly the params of one clean run."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from gcs_emulator import gcs_emulator, gcs_objects
from PIL import Image

from dgmr_jax.core.paths import as_path
from dgmr_jax.model_dir import load_config, load_model

ROOT = Path(__file__).resolve().parents[1]
STEPS = 40

# every test runs the distill CLI in fresh processes (the module-scoped reference run alone takes minutes)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(48):
        sub = root / f"class{i % 3}"
        sub.mkdir(exist_ok=True)
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype("uint8")).save(sub / f"{i}.jpg")
    (root / "corrupt.jpg").write_bytes(b"not a jpeg")
    return root


def _command(workdir: Path, images: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "dgmr_jax.cli",
        "distill",
        "--config",
        str(ROOT / "configs" / "cpu_tiny.py"),
        "--workdir",
        str(workdir),
        f"--config.data.path={images}",
        "--config.teacher.random_init=true",
        f"--config.optim.total_steps={STEPS}",
        "--config.log_indices=true",
        *extra,
    ]


def _env(devices: int = 8, **extra: str) -> dict[str, str]:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    env.update(extra)
    return env


def _run(workdir: Path, images: Path, *extra: str) -> subprocess.CompletedProcess:
    done = subprocess.run(_command(workdir, images, *extra), env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _final(workdir: Path | str) -> dict:
    workdir = as_path(workdir)
    last = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert last == STEPS
    path = workdir / "checkpoints" / str(last) / "state"
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # any saved topology -> this process
    with ocp.StandardCheckpointer() as ckpt:
        meta = ckpt.metadata(path).item_metadata
        target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
        return ckpt.restore(path, target)


def _seen(workdir: Path | str) -> dict[int, list[int]]:
    """Step -> record indices of the trajectory that survived (a redone step overwrites its first try)."""
    out = {}
    for line in (as_path(workdir) / "seen.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[row["step"]] = row["index"]
    return out


def _assert_same(a: dict, b: dict) -> None:
    for x, y in zip(jax.tree_util.tree_leaves(a["params"]), jax.tree_util.tree_leaves(b["params"]), strict=True):
        np.testing.assert_array_equal(x, y)


def _assert_close(a: dict, b: dict) -> None:
    """Params equal up to the reduction order of a different device layout (1e-5 of the largest weight)."""
    pairs = list(zip(jax.tree_util.tree_leaves(a["params"]), jax.tree_util.tree_leaves(b["params"]), strict=True))
    scale = max(float(np.abs(y).max()) for _, y in pairs)
    assert max(float(np.abs(x - y).max()) for x, y in pairs) / scale <= 1e-5


@pytest.fixture(scope="module")
def reference(tmp_path_factory, images):
    workdir = tmp_path_factory.mktemp("clean")
    _run(workdir, images)
    return workdir


def _committed(env: dict[str, str]) -> list[int]:
    """Complete checkpoint steps of gs://dgmr-test/run (Orbax marks a finished step on GCS with commit_success.txt)."""
    names = gcs_objects(env, "dgmr-test", "run/checkpoints/")
    return [int(n.split("/")[2]) for n in names if n.count("/") == 3 and n.endswith("/commit_success.txt")]


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"run ended before the interruption point: {proc.communicate()[1][-2000:]}"
        assert time.time() < deadline, "timed out waiting for the run"
        time.sleep(0.02)


def test_sigkill_mid_training_then_resume(reference, images, tmp_path):
    proc = subprocess.Popen(
        _command(tmp_path, images, "--config.async_checkpoint=true"),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(lambda: (tmp_path / "checkpoints" / "8").is_dir(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert max(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) < STEPS
    _run(tmp_path, images)
    _assert_same(_final(tmp_path), _final(reference))
    seen, clean = _seen(tmp_path), _seen(reference)
    assert seen == clean  # the resumed data order continues exactly: nothing repeated, nothing skipped
    flat = [i for step in sorted(seen) for i in seen[step]]
    assert len(flat) == STEPS * 8 and flat == [i for step in sorted(clean) for i in clean[step]]


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
    deadline, with the client's error if its retries (gcsfs: about 35 s) end first; no stall of minutes, no
    traceback."""
    with gcs_emulator("dgmr-test") as env:
        code, line = _storage_fault(env, images, signal.SIGKILL, deadline=60)
    assert code == 4
    assert re.fullmatch(
        r"dgmr-jax: error: storage at gs://dgmr-test/run (failed \(.+\): .*Connect.*|did not answer for 60 s \(.+\)); "
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


def test_sigterm_saves_and_resumes(reference, images, tmp_path):
    proc = subprocess.Popen(
        _command(tmp_path, images), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = tmp_path / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    saved = max(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert 6 <= saved < STEPS
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")  # the curves so far
    assert f"preempted (SIGTERM): saved step {saved} and stopped; run again with the same workdir to resume" in out
    _run(tmp_path, images)
    _assert_same(_final(tmp_path), _final(reference))
    assert _seen(tmp_path) == _seen(reference)


def test_ctrl_c_saves_says_so_in_one_line_and_resumes(reference, images, tmp_path):
    """Ctrl-C acts like a preemption notice: the run says so at once, saves at the next step, stops with exit
    code 130 and one closing line, and the rerun resumes there and ends bit-identical to an uninterrupted run."""
    proc = subprocess.Popen(
        _command(tmp_path, images), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = tmp_path / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    saved = max(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert proc.returncode == 130 and "Traceback" not in err and 6 <= saved < STEPS, err[-2000:]
    lines = err.splitlines()
    assert "distill: Ctrl-C: saving the next step, then stopping (Ctrl-C again: stop at once, unsaved)" in lines
    assert lines[-1] == (
        f"dgmr-jax distill: interrupted (Ctrl-C): saved step {saved} and stopped; run again with the same workdir "
        "to resume"
    )
    assert not (tmp_path / "model").exists()
    assert f"distill: resuming from step {saved} of {STEPS}" in _run(tmp_path, images).stdout
    _assert_same(_final(tmp_path), _final(reference))
    assert _seen(tmp_path) == _seen(reference)


def test_second_ctrl_c_stops_at_once_in_one_line(images, tmp_path):
    """A second Ctrl-C ends the process at once, exit code 130, with one line and no traceback, even while the
    loop waits on data (an image that is a named pipe no one writes); the rerun finishes."""
    shutil.copytree(images, tmp_path / "imgs")
    fifo = tmp_path / "imgs" / "class0" / "stalled.jpg"
    os.mkfifo(fifo)
    err_file = tmp_path / "stderr.txt"
    with err_file.open("w") as err:
        proc = subprocess.Popen(
            _command(tmp_path / "run", tmp_path / "imgs"), env=_env(), stdout=subprocess.DEVNULL, stderr=err
        )
    writer = []

    def reader_waits() -> bool:  # a writer can open the pipe without blocking once the run is reading it
        with contextlib.suppress(OSError):
            writer.append(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        return bool(writer)

    try:
        _wait_for(reader_waits, proc)
        proc.send_signal(signal.SIGINT)
        _wait_for(lambda: "Ctrl-C: saving the next step" in err_file.read_text(), proc)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        for fd in writer:
            os.close(fd)
    text = err_file.read_text()
    assert proc.returncode == 130 and "Traceback" not in text and text.count("\n") < 10, text[-3000:]
    assert text.splitlines()[-1] == "distill: Ctrl-C again: stopped at once; rerun to resume from the last saved step"
    fifo.unlink()
    shutil.copy(images / "class0" / "0.jpg", fifo)
    assert "distill done at step 40" in _run(tmp_path / "run", tmp_path / "imgs").stdout
    assert not list((tmp_path / "run" / "checkpoints").glob("*orbax-checkpoint-tmp*"))


def test_half_written_checkpoint_is_never_restored(reference, images, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    kept = min(int(p.name) for p in (reference / "checkpoints").iterdir() if p.name.isdigit())  # keep=3: 32
    shutil.copytree(reference / "checkpoints" / str(kept), tmp_path / "checkpoints" / str(kept))
    torn = tmp_path / "checkpoints" / f"{kept + 4}.orbax-checkpoint-tmp-1763712000000000"
    torn.mkdir()
    (torn / "garbage").write_bytes(b"\x00" * 10)
    done = _run(tmp_path, images)
    assert "distill done at step 40" in done.stdout
    assert f"distill: resuming from step {kept} of 40" in done.stdout  # the torn later step is passed over
    assert not torn.exists()  # and removed
    _assert_same(_final(tmp_path), _final(reference))


def _damage(step_dir: Path, how: str) -> None:
    """Damage one saved step: "truncate" or "bitflip" its largest array-data file, or delete one of its files."""
    state = step_dir / "state"
    data = max(state.glob("ocdbt.process_*/d/*"), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    if how == "truncate":
        data.write_bytes(raw[: len(raw) // 2])
    elif how == "bitflip":
        raw[len(raw) // 2] ^= 0x10
        data.write_bytes(raw)
    else:
        (state / how).unlink()


def _rows(workdir: Path) -> list[dict]:
    """metrics.jsonl without its timings."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "images_per_s"} for line in lines]


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning: ")]


@pytest.mark.parametrize("damage", ["truncate", "manifest.ocdbt", "_METADATA", "bitflip"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(reference, images, tmp_path, damage):
    """The newest step cut short, missing a file, or with one bit flipped: one warning line, the run resumes
    from the step before, redoes the rest and ends bit-identical to the undamaged run; metrics.jsonl and
    seen.jsonl hold each step once, and the count of skipped files carries on across the resume."""
    shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
    newest = tmp_path / "checkpoints" / str(STEPS)
    _damage(newest, damage)
    done = _run(tmp_path, images)
    [warning] = _warnings(done.stderr)
    assert warning.startswith(f"warning: checkpoint {newest} is damaged (") and warning.endswith("); skipped")
    if damage == "bitflip":  # read without complaint: only the checksum sees it
        assert "(checksum of 1 array(s) differs, first " in warning
    assert "Traceback" not in done.stderr
    assert f"distill: resuming from step {STEPS - 4} of {STEPS}" in done.stdout
    _assert_same(_final(tmp_path), _final(reference))
    assert _rows(tmp_path) == _rows(reference) and _rows(reference)[-1]["skipped_files"] > 0
    assert len((tmp_path / "seen.jsonl").read_text().splitlines()) == STEPS
    assert _seen(tmp_path) == _seen(reference)


def test_no_good_checkpoint_stops_in_one_line_and_deletes_nothing(reference, images, tmp_path):
    shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
    checkpoints = tmp_path / "checkpoints"
    for step in (STEPS - 8, STEPS - 4, STEPS):
        _damage(checkpoints / str(step), "manifest.ocdbt")
    before = sorted(tmp_path.rglob("*"))
    done = subprocess.run(_command(tmp_path, images), env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(_warnings(done.stderr)) == 3
    assert done.stderr.splitlines()[-1] == (
        f"dgmr-jax distill: error: no checkpoint in {checkpoints} can be restored: steps 40, 36, 32 are all damaged "
        f"(see the warnings above); start fresh with a new --workdir, or move {checkpoints} away to rerun this "
        "workdir from step 0"
    )
    # nothing deleted or changed; the compile cache may gain the step it compiled
    assert [p for p in sorted(tmp_path.rglob("*")) if "compile_cache" not in p.parts] == [
        p for p in before if "compile_cache" not in p.parts
    ]


def test_what_is_not_damage(reference, images, tmp_path):
    """A checkpoint saved before checksums existed restores unverified, with a warning; a run whose settings
    change the state's arrays is refused in one line, and no step is called damaged."""
    shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
    for step in (STEPS - 8, STEPS - 4, STEPS):
        shutil.rmtree(tmp_path / "checkpoints" / str(step) / "record")
    done = _run(tmp_path, images)
    assert _warnings(done.stderr) == [
        f"warning: checkpoint {tmp_path / 'checkpoints' / str(STEPS)} has no checksums (saved by an older "
        "dgmr-jax); restored unverified"
    ]
    assert f"distill: already finished: step {STEPS} of {STEPS}" in done.stdout
    other = subprocess.run(
        _command(tmp_path, images, "--config.optim.ema_decay=0.5"), env=_env(), capture_output=True, text=True
    )
    assert other.returncode == 2 and not _warnings(other.stderr)
    assert other.stderr.splitlines()[-1].startswith(
        f"dgmr-jax distill: error: cannot resume from {tmp_path / 'checkpoints' / str(STEPS)}: the saved state "
        "does not fit this run (not saved: ema.blocks_0.attn.proj.bias, "
    )


def _start_two_processes(workdir: Path, images: Path, *extra: str) -> list[subprocess.Popen]:
    """The distill command as two local processes of 4 fake devices each (jax.distributed)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    return [
        subprocess.Popen(
            _command(workdir, images, *extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(4, DGMR_COORDINATOR=f"localhost:{port}", DGMR_NUM_PROCESSES="2", DGMR_PROCESS_ID=str(i)),
        )
        for i in range(2)
    ]


def _finish(procs: list[subprocess.Popen]) -> list[str]:
    """Each process's stdout, once all have exited cleanly."""
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        outs.append(out)
    return outs


def _run_two_processes(workdir: Path, images: Path, *extra: str) -> None:
    _finish(_start_two_processes(workdir, images, *extra))


@pytest.mark.multiprocess
def test_two_processes_equal_one(reference, images, tmp_path):
    _run_two_processes(tmp_path, images)
    _assert_close(_final(tmp_path), _final(reference))


@pytest.mark.multiprocess
def test_two_processes_evaluate_in_the_loop_like_offline_eval(images, tmp_path):
    """In-loop kNN on 2 processes x 4 devices (features gathered from both hosts) equals `dgmr-jax eval` of the
    exported student in one process."""
    from dgmr_jax.cli import main

    _run_two_processes(tmp_path / "run", images, "--config.optim.total_steps=8", "--config.evals=['knn:mnist5k']")
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    out = tmp_path / "offline.json"
    args = ["eval", "--model", str(tmp_path / "run" / "model"), "--train", "mnist5k", "--test", "mnist5k"]
    assert main([*args, "--img-size", "32", "--out", str(out)]) == 0
    offline = json.loads(out.read_text())["knn"]
    assert last["step"] == 8 and {k: last[f"eval/knn/knn@{k}"] for k in offline} == offline


@pytest.mark.multiprocess
def test_sigterm_to_one_host_saves_all_hosts_at_one_step(reference, images, tmp_path):
    """A preemption notice reaching only the second of two processes: both save the same step (the save is a
    collective) and stop; the rerun on two processes ends where an uninterrupted run does."""
    procs = _start_two_processes(tmp_path, images)
    metrics = tmp_path / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, procs[1])
    procs[1].send_signal(signal.SIGTERM)
    outs = _finish(procs)
    saved = max(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert f"preempted (SIGTERM): saved step {saved} and stopped" in outs[0]
    assert 6 <= saved < STEPS and not (tmp_path / "model").exists()
    _run_two_processes(tmp_path, images)
    _assert_close(_final(tmp_path), _final(reference))


@pytest.mark.multiprocess
def test_ctrl_c_to_one_host_saves_all_hosts_at_one_step(images, tmp_path):
    """Ctrl-C to the second of two processes goes through the preemption service as a SIGTERM would: both save
    one step and stop; the interrupted process exits 130 with its one line, the other 0; the rerun finishes."""
    procs = _start_two_processes(tmp_path, images)
    metrics = tmp_path / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, procs[1])
    procs[1].send_signal(signal.SIGINT)
    ends = [proc.communicate(timeout=600) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 130], ends[1][1][-3000:]
    saved = max(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert 6 <= saved < STEPS and not (tmp_path / "model").exists()
    assert f"preempted (SIGTERM): saved step {saved} and stopped" in ends[0][0]
    assert ends[1][1].splitlines()[-1] == (
        f"dgmr-jax distill: interrupted (Ctrl-C): saved step {saved} and stopped; run again with the same workdir "
        "to resume"
    )
    assert f"distill done at step {STEPS}" in _finish(_start_two_processes(tmp_path, images))[0]
