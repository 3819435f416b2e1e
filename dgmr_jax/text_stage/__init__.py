"""The last DGMR stage: fine-tune the CLIP text tower contrastively against the frozen, pruned image tower."""
