"""Export to the Hugging Face Hub format: the folder, its model card, and `hub/`, the remote code.

Deliberately empty: `vqgpt.export.hub` is imported by the package (it is the one implementation of
what an export ships) without pulling in the export machinery.
"""
