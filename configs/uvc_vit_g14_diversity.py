"""UVC widths + DGMR's neuron choice on OpenCLIP ViT-g-14 at the FLOPs of DGMR prune1 (48.7%).

dgmr-jax uvc --config uvc_vit_g14_diversity --model /ckpt/g14 --flops-budget 0.487 --no-skip \
    --train array_record:/data/imagenet/train-*.array_record --steps 6255 --workdir /runs/g14_uvc --out /ckpt/g14_uvc
dgmr-jax distill --config openclip_vit_g14_prune1 --workdir /runs/g14_uvc_post \
    --config.student.model_dir=/ckpt/g14_uvc
"""

from dgmr_jax.distill.defaults import base_config, steps
from dgmr_jax.uvc.config import with_search


def get_config():
    c = with_search(base_config())
    c.teacher.update(family="open_clip", arch="ViT-g-14", dtype="bfloat16")
    c.student.update(dtype="bfloat16", remat=True)
    c.teacher.scan_layers = True  # the searched student masks per-layer units and runs unscanned
    c.global_batch = 1024
    c.optim.update(base_lr=1e-4, min_lr=1e-6, warmup_steps=steps(0.5, 1024), total_steps=steps(5, 1024))
    c.uvc.update(warmup_steps=steps(0.5, 1024), select="diversity", search_blocks=False)
    c.mesh.update(data=-1, fsdp=4, tensor=1)
    return c
