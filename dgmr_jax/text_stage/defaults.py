"""Defaults of the text-tower fine-tune (`text_config()`); each recipe file edits a copy."""

from __future__ import annotations

import ml_collections

from dgmr_jax.train.defaults import loop_defaults

FLICKR30K_TRAIN_IMAGES = 29_000
FLICKR30K_TRAIN_CAPTIONS = 5 * FLICKR30K_TRAIN_IMAGES  # one training record per (image, caption) pair


def steps(epochs: float, global_batch: int, dataset_size: int = FLICKR30K_TRAIN_CAPTIONS) -> int:
    """Optimizer steps of `epochs` passes over `dataset_size` caption records at `global_batch`."""
    return int(epochs * dataset_size // global_batch)


def text_config() -> ml_collections.ConfigDict:
    """The text-tower fine-tune's settings: optimizer, pairs, compute dtype, the loop's and evaluation's."""
    c = loop_defaults(global_batch=320, checkpoint_every=500)
    # AdamW as open_clip trains CLIP (b2 0.98, eps 1e-6), no decay on gains, biases and logit_scale;
    # lr: warmup to base_lr * global_batch / 256, cosine to min_lr; weight decay cosine wd_start -> wd_end
    c.optim = ml_collections.ConfigDict(
        dict(
            base_lr=1e-6,
            min_lr=1e-7,
            warmup_steps=0,
            total_steps=1000,
            wd_start=0.04,
            wd_end=0.2,
            b1=0.9,
            b2=0.98,
            eps=1e-6,
            clip_norm=0.0,
        )
    )
    c.data = ml_collections.ConfigDict(
        dict(
            split="train",  # tfds:NAME only
            data_dir="",  # tfds:NAME only
            image_key="image",  # tfds:NAME: the image feature
            caption_key="captions/text",  # tfds:NAME: the caption feature ("/" walks nested features)
            img_size=0,  # 0: the vision model's own
            embed_batch=64,  # images per batch when the frozen image tower embeds them (once)
            seed=0,  # shuffle of the (image, caption) records
        )
    )
    c.text = ml_collections.ConfigDict(dict(dtype="float32"))  # compute dtype (params train in float32)
    # without --clip-text: a seeded random init of --text-arch, only when asked for (quick tries, tests); a
    # forgotten --clip-text is an error, not a run from noise
    c.text.random_init = False
    c.text.seed = 0
    c.eval_images = 1000  # evaluate on the first N images of the pairs and their captions (0: all)
    c.eval_batch = 256  # captions per text-encoding batch in evaluation
    c.zeroshot = ""  # labeled images (mnist5k, a class folder, tfds:NAME): zero-shot top-1/5 at each evaluation
    c.zeroshot_templates = ""  # file of prompt templates, "{}" for the class name (default: as dgmr-jax eval)
    return c


def flickr30k_recipe(gpus: int = 8, per_device_batch: int = 320) -> ml_collections.ConfigDict:
    """DGMR's official text-tower recipe: Flickr30k, 20 epochs with 2 warm-up, lr 1e-6 -> 1e-7, weight decay
    0.04 -> 0.2, batch per_device_batch x gpus; evaluated and checkpointed once an epoch, bf16 compute."""
    c = text_config()
    c.global_batch = per_device_batch * gpus
    per_epoch = FLICKR30K_TRAIN_CAPTIONS // c.global_batch
    c.optim.update(
        base_lr=1e-6,
        min_lr=1e-7,
        warmup_steps=steps(2, c.global_batch),
        total_steps=steps(20, c.global_batch),
        wd_start=0.04,
        wd_end=0.2,
    )
    c.text.dtype = "bfloat16"
    c.eval_every = per_epoch  # retrieval recall once an epoch (on --eval-pairs, e.g. the 1k Flickr30k test images)
    c.checkpoint_every = per_epoch
    c.mesh.update(data=-1, fsdp=1, tensor=1)
    return c
