"""OpenCLIP ViT-g-14 prune1: fine-tune the text tower against the distilled image tower (DGMR's last stage).

Official recipe: Flickr30k train pairs, 20 epochs (2 warm-up), base lr 1e-6 -> 1e-7 cosine per step, weight
decay cosine 0.04 -> 0.2, batch 320 per GPU, CLIP loss over the whole global batch. Reported Flickr30k
retrieval 83.8 -> 84.0. GPUS is the device count the batch is multiplied by (8 assumed: set yours; the epoch
-> step conversion follows it).

dgmr-jax finetune-text --config configs/text_openclip_vit_g14_prune1.py --model /runs/g14_prune1/model \
    --clip-text open_clip_pytorch_model.bin --pairs /data/flickr30k_train.jsonl \
    --eval-pairs /data/flickr30k_test.jsonl --workdir /runs/g14_prune1_text
"""

from dgmr_jax.text_stage.defaults import FLICKR30K_TRAIN_CAPTIONS, steps, text_config

GPUS = 8
PER_DEVICE_BATCH = 320


def get_config():
    c = text_config()
    c.global_batch = PER_DEVICE_BATCH * GPUS
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
