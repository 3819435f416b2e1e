"""UVC on DeiT-Small at the paper's 50% FLOPs budget, block skipping, UVC's neuron choice.

dgmr-jax convert --arch deit_small_patch16_224 --checkpoint deit_small_patch16_224.safetensors --out /ckpt/deit_s
dgmr-jax uvc --config uvc_deit_small_50 --model /ckpt/deit_s --flops-budget 0.5 \
    --train array_record:/data/imagenet/train-*.array_record --steps 50045 --workdir /runs/deit_s_uvc \
    --out /ckpt/deit_s_uvc
dgmr-jax distill --config uvc_deit_small_50 --workdir /runs/deit_s_uvc_post \
    --config.teacher.model_dir=/ckpt/deit_s --config.student.model_dir=/ckpt/deit_s_uvc

--steps 50045 is 10 ImageNet epochs at batch 256 (the search; warm-up: the first epoch). Our starting point, not
a reproduction of the paper's schedule: the paper trains far longer and distils from a DeiT-B teacher with logits.
"""

from dgmr_jax.distill.defaults import base_config, steps
from dgmr_jax.uvc.config import with_search


def get_config():
    c = with_search(base_config())
    c.teacher.update(family="timm", arch="deit_small_patch16_224", dtype="bfloat16")
    c.student.update(dtype="bfloat16")
    c.global_batch = 256
    c.optim.update(base_lr=5e-4, min_lr=1e-6, warmup_steps=steps(1, c.global_batch), total_steps=steps(10, 256))
    c.uvc.update(warmup_steps=steps(1, c.global_batch), select="uvc")
    c.mesh.update(data=-1, fsdp=1, tensor=1)
    return c
