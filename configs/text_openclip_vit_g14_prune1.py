"""Text stage of OpenCLIP ViT-g-14 prune1: fine-tune the text tower on Flickr30k.

DGMR's last stage: the text tower trains against the frozen distilled image tower.
Official recipe: Flickr30k train pairs, 20 epochs (2 warm-up), base lr 1e-6 -> 1e-7 cosine per step, weight
decay cosine 0.04 -> 0.2, batch 320 per GPU, CLIP loss over the whole global batch. Reported Flickr30k
retrieval 83.8 -> 84.0. GPUS is the device count the batch is multiplied by (8 assumed: set yours; the epoch
-> step conversion follows it).

dgmr-jax finetune-text --config text_openclip_vit_g14_prune1 --model /runs/g14_prune1/model \
    --clip-text open_clip_pytorch_model.bin --pairs /data/flickr30k_train.jsonl \
    --eval-pairs /data/flickr30k_test.jsonl --workdir /runs/g14_prune1_text
"""

from dgmr_jax.text_stage.defaults import flickr30k_recipe

GPUS = 8
PER_DEVICE_BATCH = 320


def get_config():
    return flickr30k_recipe(GPUS, PER_DEVICE_BATCH)
