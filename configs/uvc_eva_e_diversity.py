"""UVC widths + DGMR's neuron choice on EVA-CLIP-E at the FLOPs of DGMR prune1 (29%).

UVC searches per-layer heads, value dims and MLP widths under the FLOPs budget (no block skipping, so it compares
width for width with DGMR), then the kept neurons are picked by Gram-Schmidt on the teacher's fc1 at each
searched width.

dgmr-jax uvc --config uvc_eva_e_diversity --model gs://bucket/eva_e --flops-budget 0.29 --no-skip \
    --train array_record:/data/imagenet/train-*.array_record --steps 5004 --workdir gs://bucket/runs/eva_e_uvc \
    --out gs://bucket/eva_e_uvc
dgmr-jax distill --config eva02_clip_e_prune1 --workdir gs://bucket/runs/eva_e_uvc_post \
    --config.student.model_dir=gs://bucket/eva_e_uvc

0.29 is the FLOPs ratio of DGMR prune1 on EVA-E (MLP 15360 -> 1792 per layer: 29.4%), so the two land at equal FLOPs.
"""

from dgmr_jax.distill.defaults import base_config, steps
from dgmr_jax.uvc.config import with_search


def get_config():
    c = with_search(base_config())
    c.teacher.update(family="eva_clip", arch="eva02_enormous_patch14_clip_224", dtype="bfloat16")
    c.student.update(dtype="bfloat16", remat=True)
    c.teacher.scan_layers = True  # the searched student masks per-layer units and runs unscanned
    c.global_batch = 1024
    c.optim.update(base_lr=6e-5, min_lr=1e-6, warmup_steps=steps(0.2, 1024), total_steps=steps(4, 1024))
    c.uvc.update(warmup_steps=steps(0.2, 1024), select="diversity", search_blocks=False)
    c.mesh.update(data=-1, fsdp=16, tensor=1)
    return c
