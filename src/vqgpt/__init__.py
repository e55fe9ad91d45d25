"""vqgpt: a VQ-VAE image tokenizer and a GPT-2 over a joint text + image vocabulary."""

__version__ = "0.2.0"
