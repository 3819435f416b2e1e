"""Damaged checkpoints: the newest falls back to the one before, none good stops in one line, and what is not
damage is not called so."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from distill_runs import STEPS, _assert_same, _command, _env, _final, _run, _seen, images, reference  # noqa: F401 (fixtures)

# every test runs the distill CLI in fresh processes (the module-scoped reference run alone takes minutes)
pytestmark = pytest.mark.slow


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
