"""OpenCLIP ViT-g-14 prune1 (hidden 1408, -52.7% params): base_lr 1e-4, 10 epochs, 1 warm-up.

dgmr-jax convert --family open_clip --arch ViT-g-14 --checkpoint open_clip_pytorch_model.bin --out /ckpt/g14
dgmr-jax prune --model /ckpt/g14 --mlp-ratio 1 --out /ckpt/g14_prune1
dgmr-jax distill --config openclip_vit_g14_prune1 --workdir /runs/g14_prune1
"""

from dgmr_jax.distill.defaults import base_config, steps


def get_config():
    c = base_config()
    c.teacher.update(model_dir="/ckpt/g14", family="open_clip", arch="ViT-g-14")
    # the prune that made student.model_dir; `plan` builds the student from it before the directory exists
    c.student.update(model_dir="/ckpt/g14_prune1", method="diversity", mlp_ratio=1.0)
    c.student.update(dtype="bfloat16", remat=True)
    # the deep stacks compile as one scanned block each (docs/pod.md, Time to first step)
    c.teacher.scan_layers = c.student.scan_layers = True
    c.distill.tap = "output"  # pooled after ln_post and proj, patch tokens after ln_post
    c.global_batch = 1024
    c.optim.update(
        base_lr=1e-4, min_lr=1e-6, warmup_steps=steps(1, c.global_batch), total_steps=steps(10, c.global_batch)
    )
    c.mesh.update(data=-1, fsdp=4, tensor=1)
    return c
