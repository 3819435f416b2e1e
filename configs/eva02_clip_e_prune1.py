"""EVA02-CLIP-bigE-14-plus prune1 (hidden 1792, -71.6% params): the published recipe.

    dgmr-jax convert --family eva_clip --arch eva02_enormous_patch14_clip_224 \\
        --checkpoint EVA02_CLIP_E_psz14_plus_s9B.pt --out /ckpt/eva_e
    dgmr-jax prune --model /ckpt/eva_e --mlp-ratio 1 --round-to 128 --out /ckpt/eva_e_prune1
    dgmr-jax distill --config eva02_clip_e_prune1 --workdir gs://bucket/eva_e_prune1 \\
        --config.data.kind=array_record --config.data.path='/data/imagenet/train-*.array_record'

Batch 40 per GPU in the paper (here 40 x 64 chips); pure bf16; raw last-block tokens on both sides.
"""

from dgmr_jax.distill.defaults import base_config, steps


def get_config():
    c = base_config()
    c.teacher.update(model_dir="/ckpt/eva_e", family="eva_clip", arch="eva02_enormous_patch14_clip_224")
    # the prune that made student.model_dir; `plan` builds the student from it before the directory exists
    c.student.update(model_dir="/ckpt/eva_e_prune1", method="diversity", mlp_ratio=1.0)
    c.student.update(dtype="bfloat16", param_dtype="bfloat16", remat=True)
    # the deep stacks compile as one scanned block each (docs/pod.md, Time to first step)
    c.teacher.scan_layers = c.student.scan_layers = True
    c.distill.tap = "raw"
    c.global_batch = 40 * 64
    c.optim.update(
        base_lr=6e-5, min_lr=1e-6, warmup_steps=steps(2, c.global_batch), total_steps=steps(10, c.global_batch)
    )
    c.data.scale = (0.9, 1.0)
    c.mesh.update(data=-1, fsdp=8, tensor=1)
    c.checkpoint_every = 1000
    c.peak_flops = 64 * 459e12  # TPU v5p bf16 peak per chip x chips; set for your hardware
    return c
