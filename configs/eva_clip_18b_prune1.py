"""EVA-CLIP-18B prune1 (hidden 25600 -> 5120, -57.1% params): the EVA02-CLIP-E prune1 setting.

    dgmr-jax convert --family eva_clip --arch EVA-CLIP-18B --checkpoint EVA_CLIP_18B_psz14_s6B.fp16.pt \\
        --out /ckpt/eva_clip_18b
    dgmr-jax prune --model /ckpt/eva_clip_18b --mlp-ratio 1 --round-to 128 --out /ckpt/eva_clip_18b_prune1
    dgmr-jax distill --config eva_clip_18b_prune1 --workdir gs://bucket/eva_clip_18b_prune1 \\
        --config.data.kind=array_record --config.data.path='/data/imagenet/train-*.array_record'

The paper publishes no EVA-CLIP-18B run; everything but the model is eva02_clip_e_prune1's: keep ratio 1 (hidden =
width), raw last-block tokens on both sides, pure bf16 with remat, 40 images per chip x 64 chips, lr 6e-5 -> 1e-6
after 2 warm-up epochs, 10 epochs, crops of 0.9-1.0. docs/pod.md plans it (v5e, v5p).
"""

from .eva02_clip_e_prune1 import get_config as eva_e_config


def get_config():
    c = eva_e_config()
    c.teacher.update(model_dir="/ckpt/eva_clip_18b", arch="EVA-CLIP-18B")
    c.student.model_dir = "/ckpt/eva_clip_18b_prune1"
    return c
