"""`dgmr-jax plan`: does a distillation recipe fit the target's memory, before any weights are read or a pod
is rented?

The step is built exactly as `distill` builds it (`trainer.model_configs` + `trainer.build_step`), with
abstract params, and compiled ahead of time for the target: a TPU topology through libtpu's compiler on
this host (`pip install 'dgmr-jax[tpu-plan]'`, no TPU needed), or N fake CPU devices, whose memory figures
are the CPU compiler's estimate and not what a TPU would use. Per-chip bytes of params, optimizer state,
EMA and teacher come from the shardings (exact); argument, temp and output bytes from the compiler, for the
step and for the start-up's init (the fresh state made on the mesh from the placed student params).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from dgmr_jax.core.errors import UserError
from dgmr_jax.core.parallel import check_batch, make_mesh
from dgmr_jax.core.paths import as_path
from dgmr_jax.distill.trainer import build_step, model_configs
from dgmr_jax.train.run import train_flops_per_image

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """What the planner needs to know of one accelerator chip."""

    name: str
    hbm_gib: float
    peak_tflops: float  # dense bf16
    wrap: bool  # torus wrap-around links (v4, v5p)


CHIPS = {
    "v4": Chip("TPU v4", 32, 275, True),
    "v5e": Chip("TPU v5e", 16, 197, False),
    "v5p": Chip("TPU v5p", 95, 459, True),
    "v6e": Chip("TPU v6e", 32, 918, False),
}

ACCELERATOR_NAMES = {"v4": "v4", "v5e": "v5litepod", "v5p": "v5p", "v6e": "v6e"}  # as gcloud names them


@dataclasses.dataclass(frozen=True)
class Target:
    """The devices a step is compiled for, and how to read the compiler's memory figures."""

    devices: list
    label: str
    chip: Chip | None  # None: fake CPU devices (memory figures are CPU estimates)


def _generation(topology: str) -> str:
    """The TPU generation of a topology name ("v5p:4x4x4" -> "v5p"); ValueError for a malformed one."""
    generation, _, shape = topology.partition(":")
    if generation not in CHIPS or not shape:
        raise UserError(f"--topology {topology!r}: expected GENERATION:SHAPE with GENERATION in {', '.join(CHIPS)}")
    return generation


def tpu_compiler_environment(topology: str) -> None:
    """Set (where unset) the environment variables that let libtpu compile for `topology` on a host without a
    TPU. They are process-wide: the CLI calls this before `tpu_target`; a library caller decides for itself."""
    generation = _generation(topology)
    # libtpu looks for a TPU host it is running on; say there is none (it would log three warnings)
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{ACCELERATOR_NAMES[generation]}-8")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling only: several planners may run at once


def tpu_target(topology: str) -> Target:
    """Abstract TPU devices of `topology` ("v5p:4x4x4", "v5e:8x8", ...) from libtpu, compiled for on this host.
    Without a TPU, call `tpu_compiler_environment(topology)` first."""
    generation = _generation(topology)
    shape = topology.partition(":")[2]
    try:
        import libtpu  # noqa: F401
    except ImportError as err:
        raise UserError(
            "--topology needs TPU's compiler: pip install 'dgmr-jax[tpu-plan]' (libtpu), or plan for --devices N "
            "fake CPU devices (CPU memory estimates)"
        ) from err
    from jax.experimental import topologies

    dims = len(shape.split("x"))
    try:
        topo = topologies.get_topology_desc(
            topology_name=topology,
            platform="tpu",
            chips_per_host_bounds=(2, 2, 1),
            num_slices=1,
            wrap=(CHIPS[generation].wrap,) * 3 if dims == 3 else (False,) * 3,
        )
    except Exception as err:  # libtpu reports a bad shape in many ways
        raise UserError(f"--topology {topology!r} is not a topology libtpu knows ({err})") from err
    return Target(list(topo.devices), topology, CHIPS[generation])


def cpu_target(count: int) -> Target:
    """`count` CPU devices of this process (the CLI makes them fake devices before JAX starts)."""
    devices = jax.devices("cpu")
    if len(devices) < count:
        raise UserError(
            f"--devices {count}: this process has {len(devices)} CPU devices; run `dgmr-jax plan` in a fresh process"
        )
    return Target(devices[:count], f"{count} CPU devices", None)


def with_presets(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, str | None]:
    """The recipe as planned before its model directories exist (a pod is planned before anything is converted):
    a missing teacher directory becomes the recipe's preset (config.teacher.arch), a missing student directory
    the teacher pruned to config.student.mlp_ratio (what `dgmr-jax prune` will make); the line that says so,
    or None when every directory the recipe names exists."""
    tc, sc = config.teacher, config.student
    teacher_missing = bool(tc.model_dir) and not as_path(tc.model_dir).exists()
    student_missing = bool(sc.model_dir) and not as_path(sc.model_dir).exists()
    if not (teacher_missing or student_missing):
        return config, None
    said = []
    if teacher_missing:
        said.append(f"teacher {tc.model_dir} -> the preset {tc.arch} (config.teacher.arch)")
    if student_missing:
        said.append(f"student {sc.model_dir} -> the teacher pruned to mlp_ratio {sc.mlp_ratio} (config.student)")
    config = ml_collections.ConfigDict(config.to_dict())
    config.teacher.model_dir = "" if teacher_missing else tc.model_dir
    config.student.model_dir = "" if student_missing else sc.model_dir
    return config, "plan: not converted yet, planned from the recipe: " + "; ".join(said)


def _peak(mem: Any) -> int:
    """Per-chip bytes a compiled program needs at once: its arguments, outputs not aliased to a donated argument,
    and temporaries."""
    return mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes


def _init_memory(step: Any) -> dict[str, int]:
    """The start-up's init compiled for the target: its per-chip peak, and the whole fresh state it makes."""
    compiled = step.init.lower(step.abstract_student()).compile()
    state = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(step.state_shapes))
    return {"init": _peak(compiled.memory_analysis()), "state_all_chips": state}


def _bytes_per_chip(shapes: Any, shardings: Any) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs laid out by `shardings`."""
    total = 0
    for shape, sharding in zip(jax.tree_util.tree_leaves(shapes), jax.tree_util.tree_leaves(shardings), strict=True):
        total += math.prod(sharding.shard_shape(shape.shape)) * np.dtype(shape.dtype).itemsize
    return total


_DEF = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+) = \w+\[([\d,]*)\]\S* (\w[\w\-]*)\(([^)]*)\)(.*)$")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+) .*\{$")
_CALLEE = re.compile(r"(?:calls|to_apply|body|true_computation|false_computation)=%([\w.\-]+)")
_CONDITION = re.compile(r"condition=%([\w.\-]+)")
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _dims(text: str) -> list[int]:
    return [int(d) for d in text.split(",") if d]


def _window_taps(n: int, w: int, m: int, field: dict[str, list[str]], k: int) -> int:
    """Window taps of one spatial dimension that meet an input element, summed over its m output positions: taps
    on padding or on the holes of lhs dilation meet none (TPU writes batched matmuls as convolutions whose
    batch dims are dilated spatial dims: one tap of each window meets the input)."""
    stride, lhs_dilate, rhs_dilate = (
        int(field[f][k]) if f in field else 1 for f in ("stride", "lhs_dilate", "rhs_dilate")
    )
    low = int(field["pad"][k].split("_")[0]) if "pad" in field else 0
    x = np.arange(m)[:, None] * stride + np.arange(w)[None, :] * rhs_dilate - low  # in the dilated, padded input
    return int(((x >= 0) & (x <= (n - 1) * lhs_dilate) & (x % lhs_dilate == 0)).sum())


def _conv_flops(dims: list[int], operands: list[list[int]], attrs: str) -> int:
    """2 x multiply-adds of one convolution: every output element sums the kernel's input features over the
    window taps that meet the input."""
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", attrs)
    if not labels or len(operands) < 2:
        return 0
    lhs, rhs, out = labels.groups()
    if "i" not in rhs or (len(operands[0]), len(operands[1]), len(dims)) != (len(lhs), len(rhs), len(out)):
        return 0
    window = re.search(r"window=\{([^}]*)\}", attrs)
    field = {f: v.split("x") for f, v in re.findall(r"(\w+)=([\w\-]+)", window.group(1) if window else "")}
    flops = 2 * math.prod(dims) * operands[1][rhs.index("i")]
    for k, d in enumerate(sorted(c for c in out if c.isdigit())):
        n, w, m = operands[0][lhs.index(d)], operands[1][rhs.index(d)], dims[out.index(d)]
        flops = flops * _window_taps(n, w, m, field, k) // m
    return flops


def _matmul_flops(dims: list[int], operands: list[list[int]], op: str, attrs: str) -> int:
    """2 x multiply-adds of one dot or convolution instruction of optimized HLO text."""
    if op == "convolution":
        return _conv_flops(dims, operands, attrs)
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attrs)
    return 2 * math.prod(dims) * math.prod(operands[0][d] for d in _dims(contracting.group(1)) if contracting)


def _named(lines: list[str], op: str) -> dict[str, str]:
    """The `op(...)` instructions of one computation: name -> the text after `op(`."""
    found = (re.match(r"^\s*(?:ROOT\s+)?%([\w.\-]+) = .*? " + op + r"\((.*)$", line) for line in lines)
    return {m.group(1): m.group(2) for m in found if m}


def _loop_trips(cond: list[str], body: list[str]) -> int:
    """Trips of a while loop whose condition is `i < N` on a tuple element that starts at 0 (scan) and that its body
    steps by a constant s: ceil(N / s) (TPU's windowed matmuls step by 2); 1 when the loop is not of that form."""
    compare = next((line for line in cond if line.lstrip().startswith("ROOT") and "direction=LT" in line), "")
    args = re.findall(r"%([\w.\-]+)", compare.split(" compare(", 1)[-1].split(")", 1)[0])
    counters = {
        k: int(v) for k, v in re.findall(r"%([\w.\-]+) = \S+ get-tuple-element\(.*?index=(\d+)", "\n".join(cond))
    }
    constants = {**_named(cond, "constant"), **_named(body, "constant")}
    if len(args) != 2 or args[0] not in counters or not constants.get(args[1], "x").split(")")[0].isdigit():
        return 1
    bound = int(constants[args[1]].split(")")[0])
    root = next((line for line in body if line.lstrip().startswith("ROOT") and " tuple(" in line), "")
    elements = re.findall(r"%([\w.\-]+)", root.split(" tuple(", 1)[-1])
    add = _named(body, "add").get(elements[counters[args[0]]] if counters[args[0]] < len(elements) else "", "")
    steps = [int(constants[a].split(")")[0]) for a in re.findall(r"%([\w.\-]+)", add) if a in constants]
    return -(-bound // max(steps[0], 1)) if steps and steps[0] > 0 else bound


def hlo_matmul_flops(hlo: str) -> tuple[float, float]:
    """(matmul FLOPs of an optimized HLO module with each while body counted once per trip, the same counted once):
    XLA's cost analysis counts a loop body once, so a scanned layer stack's FLOPs are missing (depth - 1) times."""
    shapes: dict[str, list[int]] = {}
    own: dict[str, int] = {}
    calls: dict[str, list[tuple[str, int | str]]] = {}  # callee, and for a loop body its trips or condition
    lines: dict[str, list[str]] = {}  # each computation's instructions
    entry, comp = "", ""
    for line in hlo.splitlines():
        header = _HEADER.match(line)
        if header:
            comp = header.group(1)
            entry = comp if line.startswith("ENTRY") else entry
            own[comp], calls[comp], lines[comp] = 0, [], []
            continue
        if not comp:
            continue
        lines[comp].append(line)
        # a while's result is a tuple (no _DEF match); its trips are annotated (CPU, GPU) or read off its condition
        trips = _TRIPS.search(line) if " while(" in line else None
        cond = _CONDITION.search(line) if " while(" in line else None
        loop = int(trips.group(1)) if trips else (cond.group(1) if cond else 1)
        calls[comp] += [(c, loop) for c in _CALLEE.findall(line)]
        m = _DEF.match(line)
        if m:
            name, dims, op = m.group(1), _dims(m.group(2)), m.group(3)
            shapes[name] = dims
            if op in ("dot", "convolution"):
                operands = [shapes.get(a.strip().lstrip("%"), []) for a in m.group(4).split(",")]
                own[comp] += _matmul_flops(dims, operands, op, m.group(5))

    def trips(loop: int | str, body: str) -> int:
        return loop if isinstance(loop, int) else _loop_trips(lines.get(loop, []), lines.get(body, []))

    @functools.cache
    def total(name: str, per_trip: bool) -> int:
        callees = calls.get(name, [])
        return own.get(name, 0) + sum((trips(n, c) if per_trip else 1) * total(c, per_trip) for c, n in callees)

    return float(total(entry, True)), float(total(entry, False))


def compiled_flops(compiled: Any) -> tuple[float, float]:
    """(FLOPs of a compiled step with scanned loops counted per trip, XLA's own cost-analysis figure): XLA's
    figure plus the matmul FLOPs of every loop body's trips after its first, read off the optimized HLO."""
    cost = compiled.cost_analysis()
    xla = float((cost[0] if isinstance(cost, Sequence) else cost).get("flops", 0.0))
    per_trip, once = hlo_matmul_flops(compiled.as_text())
    return xla + per_trip - once, xla


def plan_step(
    config: ml_collections.ConfigDict,
    target: Target,
    mfu: float = 0.4,
    hbm_gib: float | None = None,
    peak_tflops: float | None = None,
) -> dict[str, Any]:
    """Compile the recipe's train step for `target`; per-chip memory (bytes), FLOPs and timings. HBM and peak
    default to the TPU generation's; `hbm_gib` / `peak_tflops` override them (and give CPU targets both)."""
    mesh = make_mesh(**dict(config.mesh), devices=target.devices)
    check_batch(config.global_batch, mesh)
    teacher_cfg, model_cfg = model_configs(config)
    step = build_step(config, mesh, teacher_cfg, model_cfg)
    img_size = config.data.img_size or model_cfg.img_size
    start = time.perf_counter()
    compiled = step.fn.lower(*step.abstract_inputs(mesh, config.global_batch, img_size)).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    flops, flops_xla = compiled_flops(compiled)
    chips = len(target.devices)
    state, sh = step.state_shapes, step.state_sh
    analytic = config.global_batch * train_flops_per_image(step, img_size)
    row = {
        "target": target.label,
        "chips": chips,
        "mesh": dict(mesh.shape),
        "batch_per_chip": config.global_batch / chips,
        "remat": config.student.remat,
        "params": _bytes_per_chip(state.params, sh.params),
        "optimizer": _bytes_per_chip(state.opt_state, sh.opt_state),
        "ema": _bytes_per_chip(state.ema, sh.ema) if state.ema is not None else 0,
        "teacher": _bytes_per_chip(step.teacher_shapes, step.teacher_sh),
        "arguments": mem.argument_size_in_bytes,
        "temp": mem.temp_size_in_bytes,
        "outputs": mem.output_size_in_bytes,
        "aliased": mem.alias_size_in_bytes,
        "flops_compiled": flops,
        "flops_xla": flops_xla,
        "flops_analytic": analytic / chips,
        "compile_s": compile_s,
        "memory_source": "TPU compiler" if target.chip else "CPU compiler estimate (not a TPU figure)",
    }
    row["total"] = _peak(mem)  # donated state: outputs reuse the argument buffers they alias
    row.update(_init_memory(step))
    hbm_gib = hbm_gib or (target.chip and target.chip.hbm_gib)
    peak_tflops = peak_tflops or (target.chip and target.chip.peak_tflops)
    if hbm_gib:
        row["hbm"] = hbm_gib * GIB
    if peak_tflops:
        row["mfu"] = mfu
        row["step_s"] = row["flops_analytic"] / (peak_tflops * 1e12 * mfu)
    return row


def fits(row: dict[str, Any]) -> bool:
    return "hbm" not in row or max(row["total"], row["init"]) <= row["hbm"]


def search_space(
    config: ml_collections.ConfigDict,
    chips: int,
    batches: Sequence[int] | None = None,
    fsdps: Sequence[int] | None = None,
    remats: Sequence[bool] = (False, True),
) -> list[ml_collections.ConfigDict]:
    """Variants of `config`: per-chip batches (default: the recipe's, halved three times), fsdp splits of the
    chips (default: every power of two; data takes the rest, tensor 1) and student remat settings."""
    per_chip = max(config.global_batch // chips, 1)
    batches = batches or sorted({max(per_chip >> i, 1) for i in range(4)}, reverse=True)
    fsdps = fsdps or [2**i for i in range(int(math.log2(chips)) + 1) if chips % 2**i == 0]
    bad = [f for f in fsdps if f < 1 or chips % f]
    if bad or min(batches) < 1:
        raise UserError(f"--search-fsdp must divide the {chips} chips and --search-batches be >= 1, got {fsdps}")
    variants = []
    for batch, fsdp, remat in itertools.product(batches, fsdps, remats):
        c = ml_collections.ConfigDict(config.to_dict())
        c.global_batch = batch * chips
        c.mesh.update(data=chips // fsdp, fsdp=fsdp, tensor=1)
        c.student.remat = remat
        variants.append(c)
    return variants


def pick(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The fitting plan with the largest per-chip batch; then without remat (faster), then the least fsdp."""
    fitting = [r for r in rows if fits(r)]
    return min(fitting, key=lambda r: (-r["batch_per_chip"], r["remat"], r["mesh"]["fsdp"]), default=None)


def plan_search(
    variants: Sequence[ml_collections.ConfigDict],
    target: Target,
    mfu: float = 0.4,
    hbm_gib: float | None = None,
    peak_tflops: float | None = None,
    report: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """`plan_step` of each variant (from `search_space`), reporting progress and each plan; variants that cannot
    be laid out on the target (ValueError) are reported as skipped and left out."""
    rows = []
    for i, variant in enumerate(variants, 1):
        mesh = dict(variant.mesh)
        report(f"[{i}/{len(variants)}] batch {variant.global_batch}, mesh {mesh}, remat {variant.student.remat}")
        try:
            row = plan_step(variant, target, mfu, hbm_gib, peak_tflops)
        except ValueError as err:
            report(f"  skipped: {err}")
            continue
        rows.append(row)
        report(describe(row))
    return rows


def gib(n: float) -> str:
    """Bytes as GiB, to three significant digits."""
    return f"{n / GIB:.3g}"


def describe(row: dict[str, Any]) -> str:
    """One plan, per chip, in GiB: a few lines of text."""
    mesh = " ".join(f"{k}={v}" for k, v in row["mesh"].items())
    hbm = f" of {gib(row['hbm'])} HBM" if "hbm" in row else ""
    lines = [
        f"{row['target']} ({row['chips']} chips), mesh {mesh}, {row['batch_per_chip']:g} images/chip, "
        f"remat {'on' if row['remat'] else 'off'}, compiled in {row['compile_s']:.1f} s",
        f"  per chip, GiB: params {gib(row['params'])}, optimizer {gib(row['optimizer'])}, "
        f"EMA {gib(row['ema'])}, teacher {gib(row['teacher'])} (from the shardings)",
        f"  {row['memory_source']}, GiB: arguments {gib(row['arguments'])}, temp {gib(row['temp'])}, "
        f"outputs {gib(row['outputs'])} (aliased {gib(row['aliased'])}) -> total {gib(row['total'])}{hbm}",
        f"  start-up init (the fresh state made on the mesh), GiB: peak {gib(row['init'])} per chip, of a "
        f"{gib(row['state_all_chips'])} state over all chips",
        f"  FLOPs per chip per step: {row['flops_compiled']:.4g} compiled (remat recompute included; scanned "
        f"layers per trip, XLA's cost analysis says {row['flops_xla']:.4g}), {row['flops_analytic']:.4g} analytic "
        "(3 x student + teacher)",
    ]
    if "step_s" in row:
        lines.append(f"  step time at MFU {row['mfu']:g} (an assumption; set it with --mfu): {row['step_s']:.3g} s")
    return "\n".join(lines)


def search_table(rows: list[dict[str, Any]]) -> str:
    """The searched plans as a markdown table: per-chip batch, mesh, remat, memory, fit."""
    lines = [
        "| images/chip | mesh (data, fsdp, tensor) | remat | temp GiB | total GiB | init GiB | fits |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mesh = ", ".join(str(v) for v in r["mesh"].values())
        cells = [f"{r['batch_per_chip']:g}", mesh, str(r["remat"]), gib(r["temp"]), gib(r["total"]), gib(r["init"])]
        lines.append("| " + " | ".join(cells) + f" | {'yes' if fits(r) else 'no'} |")
    return "\n".join(lines)


def pick_flags(rows: list[dict[str, Any]], target: Target) -> str:
    """The `pick` of the searched plans as recipe overrides; ValueError when none fits."""
    best = pick(rows)
    if best is None:
        raise UserError(f"nothing fits {target.label}: not at 1 image per chip, any fsdp split, with remat")
    mesh = " ".join(f"--config.mesh.{k}={v}" for k, v in best["mesh"].items())
    batch = int(best["batch_per_chip"] * best["chips"])
    return f"--config.global_batch={batch} {mesh} --config.student.remat={best['remat']}"


def check_fits(row: dict[str, Any], target: Target) -> None:
    """ValueError, with what to try, when a plan needs more memory per chip than the target has."""
    if not fits(row):
        raise UserError(
            f"does not fit: {gib(max(row['total'], row['init']))} GiB per chip > {gib(row['hbm'])} GiB HBM on "
            f"{target.label}; "
            "try --search, a smaller --config.global_batch, more --config.mesh.fsdp or --config.student.remat=true"
        )
