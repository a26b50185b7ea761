"""fusedrnn: fused, drop-in replacements for torch.nn.LSTM, GRU and RNN."""

from .backend import available_backends
from .compile import compile_support
from .convert import convert, revert
from .modules import GRU, LSTM, RNN

__all__ = ["GRU", "LSTM", "RNN", "available_backends", "compile_support", "convert", "revert"]
__version__ = "0.1.0"
