"""EVA02-CLIP-bigE-14-plus prune2 (hidden 3584, -62.1% params): prune1 at mlp ratio 2.

dgmr-jax prune --model /ckpt/eva_e --mlp-ratio 2 --round-to 128 --out /ckpt/eva_e_prune2
dgmr-jax distill --config eva02_clip_e_prune2 --workdir gs://bucket/eva_e_prune2
"""

from .eva02_clip_e_prune1 import get_config as prune1


def get_config():
    c = prune1()
    c.student.update(model_dir="/ckpt/eva_e_prune2", mlp_ratio=2.0)
    return c
