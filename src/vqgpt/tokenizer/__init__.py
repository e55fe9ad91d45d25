"""Stage one, the image tokenizer: quantizer, kernels, VQ-VAE, losses, metrics, evaluation,
training loop, and applying a trained tokenizer to files (encode / reconstruct).

Never imports `vqgpt.lm`, `vqgpt.eval`, the export machinery or the CLI.
"""
