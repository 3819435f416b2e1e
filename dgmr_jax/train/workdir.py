"""What a run's workdir records besides checkpoints: the run's identity and the student's model.

`run.json` holds the run signature (which teacher, student, data and batch the checkpoints belong to)
and the student's ModelConfig and meta, so a resume with other inputs fails in one line before Orbax
sees mismatched trees, and any saved step becomes a model directory without rebuilding the run.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jax
import ml_collections
from etils import epath

from dgmr_jax.core import storage
from dgmr_jax.core.errors import UserError
from dgmr_jax.core.paths import PathLike, as_path, canonical, check_writable
from dgmr_jax.io.model_dir import check_new_dir, restore_numpy, save_model
from dgmr_jax.models.config import ModelConfig

RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"
FINAL_MODEL = "model"  # workdir/model: the student at the end of the run
STEP_MODELS = "models"  # workdir/models/step_<N>: students written on request (--export-every, --from-checkpoint)
_DESCRIPTION = re.compile(r"\w+\(.*\)")  # the repr of a data source, as a signature's "data" records it


def signature(config: ml_collections.ConfigDict, source: Any) -> dict[str, Any]:
    """The inputs a run's checkpoints and data-iterator state depend on (not the schedule: runs may be
    extended), named by the `--config.` fields that set them."""
    tc, sc, dc = config.teacher, config.student, config.data
    weights = tc.model_dir or tc.checkpoint
    teacher = canonical(weights) if weights else f"{tc.arch} {dict(tc.arch_overrides)} seed {tc.seed}"
    student = canonical(sc.model_dir) if sc.model_dir else f"{sc.method} mlp_ratio {sc.mlp_ratio} of the teacher"
    sig = {
        "teacher": teacher,
        "student": student,
        "data": repr(source),
        "data.img_size": dc.img_size,  # 0: the student's own, fixed by the models signed above
        "data.seed": dc.seed,
        "global_batch": config.global_batch,
    }
    if sc.get("scan_layers"):  # the checkpointed student is stacked: an unscanned run cannot resume it
        sig["student.scan_layers"] = True
    return sig


def read_record(workdir: PathLike) -> dict[str, Any] | None:
    """The run record of `workdir`, or None for a new workdir."""
    path = as_path(workdir) / RUN_FILE
    with storage.guard(f"reading {RUN_FILE}"):
        return json.loads(path.read_text()) if path.exists() else None


def same_input(old: Any, new: Any) -> bool:
    """Whether a recorded signature value names the input `new` names. Paths are recorded resolved (`canonical`);
    a record written before that may hold relative paths as typed, which are taken as typed or resolved against
    the current folder: a resume from the folder the run started in still matches, one from elsewhere cannot be
    told from other inputs."""
    return old == new or (isinstance(old, str) and isinstance(new, str) and _resolved(old) == new)


def _resolved(old: str) -> str:
    """A recorded value with its relative paths resolved: the value itself, or each quoted path in a data
    source's description such as ArrayRecordSource(paths=['train.array_record'], num_records=9)."""
    if _DESCRIPTION.fullmatch(old):
        return re.sub(r"'([^']*)'", lambda quoted: repr(canonical(quoted.group(1))), old)
    return canonical(old)


def check_resume(workdir: PathLike, sig: dict[str, Any]) -> None:
    """Before any long work, fail in one line if `workdir` cannot be written or holds saved steps of a run with
    other inputs (what differs, how to start fresh). A run.json without a saved step pins nothing: that run never
    got going, and a corrected rerun replaces it."""
    check_writable(workdir, "--workdir")
    record = read_record(workdir)
    if record is None or not saved_steps(workdir):
        return
    old = record["signature"]
    diffs = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in sig.items() if not same_input(old.get(k), v)]
    if diffs:
        raise UserError(
            f"workdir {as_path(workdir)} holds a run with other inputs ({'; '.join(diffs)}); to start fresh use a "
            "new --workdir (or delete this one), or restore the original settings to resume it"
        )


def record_run(workdir: PathLike, sig: dict[str, Any], cfg: ModelConfig, meta: dict[str, Any]) -> None:
    """Write run.json (process 0) until the run's first saved step: its signature and the student's config and
    meta. Once a step is saved, the record stays what that step was trained with."""
    workdir = as_path(workdir)
    with storage.guard(f"writing {RUN_FILE}"):
        if jax.process_index() != 0 or saved_steps(workdir):
            return
        workdir.mkdir(parents=True, exist_ok=True)
        student = {"config": json.loads(cfg.to_json()), "meta": meta}
        (workdir / RUN_FILE).write_text(json.dumps({"signature": sig, "student": student}, indent=2))


def saved_steps(workdir: PathLike) -> list[int]:
    """Steps with a complete train-state checkpoint in `workdir`."""
    directory = as_path(workdir) / CHECKPOINTS
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def write_student(
    out: PathLike, cfg: ModelConfig, meta: dict[str, Any], params: Any, step: int, ema: bool, workdir: PathLike
) -> epath.Path:
    """Save trained student params as a model directory whose meta says where they came from."""
    distilled = {"workdir": str(as_path(workdir)), "step": step, "weights": "ema" if ema else "params"}
    params = jax.block_until_ready(params)  # steps still computing are not storage time
    with storage.guard(f"writing the model directory {out}"):
        return save_model(out, cfg, params, **{**meta, "distilled": distilled})


def student_from_checkpoint(workdir: PathLike, step: int, out: PathLike | None = None, ema: bool = False) -> epath.Path:
    """Turn the train state saved at `step` into a model directory (default workdir/models/step_<step>)."""
    workdir = as_path(workdir)
    record = read_record(workdir)
    if record is None:
        raise FileNotFoundError(f"{workdir} has no {RUN_FILE}: it is not a `dgmr-jax distill` workdir")
    steps = saved_steps(workdir)
    if step not in steps:
        raise UserError(f"--from-checkpoint {step}: {workdir / CHECKPOINTS} holds steps {steps or 'none'}")
    out = check_new_dir(out or workdir / STEP_MODELS / f"step_{step}")  # before the weights are read
    key = "ema" if ema else "params"
    params = restore_numpy(workdir / CHECKPOINTS / str(step) / "state", [key]).get(key)
    if params is None:
        raise UserError(f"step {step} holds no EMA weights (the run had optim.ema_decay = 0); drop --ema")
    cfg = ModelConfig.from_dict(record["student"]["config"])
    return write_student(out, cfg, record["student"]["meta"], params, step, ema, workdir)
