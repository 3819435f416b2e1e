"""DINOv2-g prune1 (SwiGLU 4096 -> 1536, -41.6% params): 10 epochs, EMA 0.997.

base_lr 7.5e-6, min_lr 1e-7, 1 warm-up epoch.

    dgmr-jax convert --family dinov2 --arch vit_giant_patch14_dinov2 --checkpoint dinov2_vitg14_pretrain.pth \\
        --out /ckpt/dinov2_g
    dgmr-jax prune --model /ckpt/dinov2_g --mlp-ratio 1 --out /ckpt/dinov2_g_prune1
    dgmr-jax distill --config dinov2_g_prune1 --workdir /runs/dinov2_g_prune1
"""

from dgmr_jax.distill.defaults import base_config, steps


def get_config():
    c = base_config()
    c.teacher.update(model_dir="/ckpt/dinov2_g", family="dinov2", arch="vit_giant_patch14_dinov2")
    # the prune that made student.model_dir (hidden 1536 = 1 x width); `plan` builds the student from it
    c.student.update(model_dir="/ckpt/dinov2_g_prune1", method="diversity", mlp_ratio=1.0)
    c.student.update(dtype="bfloat16", remat=True)
    # the deep stacks compile as one scanned block each (docs/pod.md, Time to first step)
    c.teacher.scan_layers = c.student.scan_layers = True
    c.distill.tap = "output"  # class and patch tokens after the final norm
    c.global_batch = 1024
    c.data.img_size = 224
    c.optim.update(
        base_lr=7.5e-6,
        min_lr=1e-7,
        warmup_steps=steps(1, c.global_batch),
        total_steps=steps(10, c.global_batch),
        ema_decay=0.997,
    )
    c.mesh.update(data=-1, fsdp=4, tensor=1)
    return c
