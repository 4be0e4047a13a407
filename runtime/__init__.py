"""Torch-free LLaDA runtime: numpy + onnxruntime + tokenizers."""
