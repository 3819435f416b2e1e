"""Model I/O: model directories, PyTorch / safetensors checkpoint readers and writers, the conversion maps, the
CLIP text tower, and `open_model` on top of them (one opener for every stage)."""
