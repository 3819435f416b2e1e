"""Tiny CPU recipe (the tests'): a 2-layer ViT-Ti teacher at 32 px, its prune1 student.

dgmr-jax distill --config cpu_tiny --workdir /tmp/run --config.data.path=/path/to/images \
    --config.teacher.model_dir=DIR
(or --config.teacher.random_init=true for a seeded random-init teacher, as the tests use)
"""

from dgmr_jax.distill.defaults import base_config


def get_config():
    c = base_config()
    c.teacher.arch = "vit_tiny_patch16_224"
    c.teacher.arch_overrides = dict(depth=2, img_size=32)
    c.teacher.dtype = "float32"
    c.student.dtype = "float32"
    c.optim.update(base_lr=1e-3, min_lr=1e-5, warmup_steps=2, total_steps=12, eps=1e-6)
    c.global_batch = 8
    c.checkpoint_every = 4
    c.log_every = 2
    c.async_checkpoint = False
    return c
