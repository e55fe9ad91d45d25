"""Remote code copied into Hub exports (imports torch/transformers/numpy/PIL only, never vqgpt)."""
