"""DINOv2-g prune (SwiGLU 4096 -> 1536, -41.6% params): base_lr 7.5e-6, min_lr 1e-7, 10 epochs, EMA 0.997.

    dgmr-jax convert --family dinov2 --arch vit_giant_patch14_dinov2 --checkpoint dinov2_vitg14_pretrain.pth \\
        --out /ckpt/dinov2_g
    dgmr-jax prune --model /ckpt/dinov2_g --hidden 1536 --out /ckpt/dinov2_g_prune1
    dgmr-jax distill --config configs/dinov2_g_prune1.py --workdir /runs/dinov2_g_prune1
"""

from dgmr_jax.distill.defaults import base_config, steps


def get_config():
    c = base_config()
    c.teacher.update(model_dir="/ckpt/dinov2_g", family="dinov2")
    c.student.update(model_dir="/ckpt/dinov2_g_prune1", dtype="bfloat16", remat=True)
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
