"""Text stage of EVA02-CLIP-E prune1: fine-tune the text tower (EVA02-E-14-plus) on Flickr30k.

The text tower trains against the frozen distilled image tower.
Official recipe: Flickr30k train pairs, 20 epochs (2 warm-up), base lr 1e-6 -> 1e-7 cosine per step, weight
decay cosine 0.04 -> 0.2, batch 320 per GPU, CLIP loss over the whole global batch. Reported Flickr30k
retrieval 85.2 -> 86.1. GPUS is the device count the batch is multiplied by (8 assumed: set yours; the epoch
-> step conversion follows it).

dgmr-jax finetune-text --config text_eva02_clip_e_prune1 --model /runs/eva_e_prune1/model \
    --clip-text EVA02_CLIP_E_psz14_plus_s9B.pt --text-arch EVA02-E-14-plus --pairs /data/flickr30k_train.jsonl \
    --eval-pairs /data/flickr30k_test.jsonl --workdir /runs/eva_e_prune1_text
"""

from dgmr_jax.text_stage.defaults import flickr30k_recipe

GPUS = 8
PER_DEVICE_BATCH = 320


def get_config():
    return flickr30k_recipe(GPUS, PER_DEVICE_BATCH)
