"""Time Machine demo: the d2l book's character-level deep-LSTM language model trained through fusedrnn.

Run it with `python -m fusedrnn.demo` (see `--help`); `main(argv)` is the same entry point in-process.
"""
from .cli import main

__all__ = ["main"]
