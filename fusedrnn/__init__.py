"""fusedrnn: fused, drop-in replacements for torch.nn.LSTM, GRU and RNN."""

from .backend import available_backends
from .compile import compile_support
from .convert import convert
from .modules import GRU, LSTM, RNN

__all__ = ["LSTM", "GRU", "RNN", "convert", "available_backends", "compile_support"]
__version__ = "0.1.0"
