"""Peak host memory of streamed pruning: synthetic bf16 checkpoints of 4 and 16 layers, either EVA02-CLIP-E-shaped
(one timm-layout .safetensors) or InternViT-6B-shaped (a Hugging Face directory: config.json naming
InternVisionModel, safetensors shards of at most --shard-mb and their index, written shard by shard).

    python benchmarks/prune_memory.py [--model eva_e|internvit_6b] [--layers 4 16] [--workdir /tmp/dgmr_prune_memory]

Each checkpoint is pruned to prune1 (hidden = width) by `dgmr-jax prune` in a fresh process (the InternViT
directory without --family/--arch: its config.json names them), which reports its own peak RSS (VmHWM,
Linux). Streaming holds one layer plus the output, so the 16-layer peak may exceed the 4-layer peak by at
most one float32 fc1 plus the extra output.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

from dgmr_jax.io.checkpoint_io import save_safetensors
from dgmr_jax.io.keymaps import rules
from dgmr_jax.models.cost import count_params
from dgmr_jax.models.presets import preset
from dgmr_jax.models.tree import flatten
from dgmr_jax.models.vit import param_shapes

# model -> (preset, family)
MODELS = {
    "eva_e": ("eva02_enormous_patch14_clip_224", "timm"),
    "internvit_6b": ("InternViT-6B-448px-V2_5", "internvit"),
}


def fc1_f32_mb(name: str) -> float:
    cfg = preset(name)
    return cfg.width * cfg.mlp_hidden[0] * 4 / 1e6


def random_tensors(name: str, family: str, depth: int, seed: int = 0):
    """(torch name, random bf16 array) of the tower in `family`'s layout, one tensor at a time."""
    cfg = preset(name, depth=depth)
    rng = np.random.default_rng(seed)
    shapes = flatten(param_shapes(cfg))
    for rule in rules(cfg, family):  # torch shapes: flax shapes through the rule's layout
        (flax_path,) = rule.flax
        shape = tuple(shapes[flax_path].shape)
        if rule.hook == "linear":
            shape = shape[::-1]
        elif rule.hook == "conv":
            shape = (shape[3], shape[2], shape[0], shape[1])
        (torch_name,) = rule.torch
        yield torch_name, (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)


def write_checkpoint(path: Path, depth: int, seed: int = 0) -> list[str]:
    """A timm-layout EVA-E vision tower of `depth` layers in one .safetensors; the prune arguments that read it."""
    name, family = MODELS["eva_e"]
    save_safetensors(path, dict(random_tensors(name, family, depth, seed)))
    config = path.with_suffix(".json")
    config.write_text(preset(name, depth=depth).to_json())
    return ["--checkpoint", str(path), "--arch", str(config)]


def write_hf_directory(folder: Path, depth: int, shard_mb: float, seed: int = 0) -> list[str]:
    """An InternViT-6B of `depth` layers as its Hub repository lays it out (OpenGVLab's InternVisionModel config.json,
    safetensors shards of at most shard_mb, model.safetensors.index.json), written one shard at a time."""
    name, family = MODELS["internvit_6b"]
    folder.mkdir()
    shards, shard, size = [], {}, 0
    for torch_name, value in random_tensors(name, family, depth, seed):
        if shard and size + value.nbytes > shard_mb * 1e6:
            shards.append(list(shard))
            save_safetensors(folder / f"shard-{len(shards)}", shard)
            shard, size = {}, 0
        shard[torch_name], size = value, size + value.nbytes
    shards.append(list(shard))
    save_safetensors(folder / f"shard-{len(shards)}", shard)
    weight_map = {}
    for i, names in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        (folder / f"shard-{i}").rename(folder / file)
        weight_map |= dict.fromkeys(names, file)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = preset(name, depth=depth)
    config = dict(architectures=["InternVisionModel"], model_type="intern_vit_6b", hidden_size=cfg.width)
    config |= dict(num_hidden_layers=depth, num_attention_heads=cfg.num_heads, intermediate_size=cfg.mlp_hidden[0])
    config |= dict(qkv_bias=False, qk_normalization=True, norm_type="rms_norm", layer_norm_eps=cfg.norm_eps)
    config |= dict(image_size=cfg.img_size, patch_size=cfg.patch_size, hidden_act="gelu")
    (folder / "config.json").write_text(json.dumps(config))
    return ["--checkpoint", str(folder)]


# VmHWM is the peak RSS of this process image alone. getrusage's ru_maxrss is not: a forked child inherits
# the parent's high-water mark, and this parent held a whole synthetic checkpoint while writing it.
_CHILD = (
    "import re, sys\n"
    "from dgmr_jax.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "hwm = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)\n"
    "print('PEAK_RSS_KB', hwm, file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def run(source: list[str], out: Path) -> tuple[float, float]:
    """(peak RSS in MB of that process alone, seconds) of one `dgmr-jax prune` run of the checkpoint `source` names."""
    start = time.perf_counter()
    args = ["prune", *source, "--mlp-ratio", "1", "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    seconds = time.perf_counter() - start
    peak_kb = int(done.stderr.rsplit("PEAK_RSS_KB", 1)[1].split()[0])
    return peak_kb / 1024, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="eva_e")
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--shard-mb", type=float, default=1000, help="largest shard (internvit_6b)")
    parser.add_argument("--workdir", default="/tmp/dgmr_prune_memory")
    args = parser.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rows = []
    name = MODELS[args.model][0]
    for depth in args.layers:
        ckpt = work / f"{args.model}_{depth}"
        if args.model == "eva_e":
            ckpt = ckpt.with_suffix(".safetensors")
            source = write_checkpoint(ckpt, depth)
        else:
            source = write_hf_directory(ckpt, depth, args.shard_mb)
        out = work / f"pruned_{depth}"
        peak, seconds = run(source, out)
        out_mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
        slim = preset(name, depth=depth, hidden=preset(name).width)
        files = list(ckpt.rglob("*")) if ckpt.is_dir() else [ckpt]
        rows.append(
            dict(
                layers=depth,
                ckpt_mb=sum(f.stat().st_size for f in files) / 1e6,
                shards=sum(f.suffix == ".safetensors" for f in files),
                out_mb=out_mb,
                peak_rss_mb=peak,
                seconds=seconds,
                out_params=count_params(slim),
            )
        )
        if ckpt.is_dir():
            shutil.rmtree(ckpt)
        else:
            ckpt.unlink()
    rows.sort(key=lambda r: r["layers"])
    print("| layers | checkpoint MB | shards | output MB | peak RSS MB | seconds | s/layer |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['layers']} | {r['ckpt_mb']:.0f} | {r['shards']} | {r['out_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
            f"{r['seconds']:.1f} | {r['seconds'] / r['layers']:.2f} |"
        )
    small, big = rows[0], rows[-1]
    growth = big["peak_rss_mb"] - small["peak_rss_mb"]
    # the output the process holds: pruned params in the checkpoint's dtype (bf16), not the compressed files
    fc1_mb = fc1_f32_mb(name)
    allowed = fc1_mb + 2 * (big["out_params"] - small["out_params"]) / 1e6
    per_layer = (big["seconds"] - small["seconds"]) / (big["layers"] - small["layers"])
    print(
        f"\npeak growth {growth:.0f} MB vs allowed {allowed:.0f} MB (one fp32 fc1 {fc1_mb:.0f} MB + "
        f"output difference): {'OK' if growth <= allowed else 'OVER'}"
    )
    full = preset(name).depth
    print(f"extrapolated {full}-layer time: {small['seconds'] + per_layer * (full - small['layers']):.0f} s")
    peak_per_layer = growth / (big["layers"] - small["layers"])
    print(
        f"extrapolated {full}-layer peak RSS: {small['peak_rss_mb'] + peak_per_layer * (full - small['layers']):.0f} MB"
    )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
