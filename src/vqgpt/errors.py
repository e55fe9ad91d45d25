"""The errors vqgpt raises for bad input: each names the file, key or value and what to do.

Every one derives from `VqgptError`, which the CLI prints as one line (`vqgpt CMD: error: ...`,
exit status 2) instead of a traceback. They also derive from the built-in type a caller would
expect (ValueError for bad values, RuntimeError for data that cannot be read), so code written
against those keeps working.
"""


class VqgptError(Exception):
    """Base class of vqgpt's own errors."""


__all__ = ["VqgptError"]
