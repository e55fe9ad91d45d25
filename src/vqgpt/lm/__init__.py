"""Stage two, the language model: joint vocabulary, training sequences, pretokenisation, batches,
the GPT-2 and its loss, evaluation, the training loop, the pipeline folder and decoding.
"""
