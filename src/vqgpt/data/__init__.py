"""Image datasets in: every source as `image` + `text` columns, robust decoding, the built-in shapes.

Imports no model: `tokenizer`, `lm` and `eval` read data through this package.
"""
