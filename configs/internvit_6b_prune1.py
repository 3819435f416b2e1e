"""InternViT-6B-448px-V2_5 prune1 (hidden 12800 -> 3200, -49.9% params): the EVA02-CLIP-E setting.

    dgmr-jax convert --checkpoint /hub/InternViT-6B-448px-V2_5 --out /ckpt/internvit_6b
    dgmr-jax prune --model /ckpt/internvit_6b --mlp-ratio 1 --round-to 128 --out /ckpt/internvit_6b_prune1
    dgmr-jax distill --config internvit_6b_prune1 --workdir gs://bucket/internvit_6b_prune1 \\
        --config.data.kind=array_record --config.data.path='/data/imagenet/train-*.array_record'

The paper publishes no InternViT run; everything but the model is eva02_clip_e_prune1's: keep ratio 1 (hidden =
width), raw last-block tokens on both sides (InternViT has no final norm: its own output), pure bf16 with remat,
40 images per chip x 64 chips, lr 6e-5 -> 1e-6 after 2 warm-up epochs, 10 epochs, crops of 0.9-1.0, at the
model's own 448 px (1025 tokens). docs/pod.md plans it (v5e, v5p).
"""

from .eva02_clip_e_prune1 import get_config as eva_e_config


def get_config():
    c = eva_e_config()
    c.teacher.update(model_dir="/ckpt/internvit_6b", family="internvit", arch="InternViT-6B-448px-V2_5")
    c.student.model_dir = "/ckpt/internvit_6b_prune1"
    return c
