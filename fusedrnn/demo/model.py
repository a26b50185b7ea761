"""The character language model of the d2l book: one-hot input -> stacked RNN -> Linear on every step.

`CharLM` has the attribute names of the book's `RNNModel` (`rnn`, `linear`), so its state_dict loads
into that model, and a fusedrnn model's state_dict loads into the torch.nn one and back.
"""
import torch
from torch import nn
from torch.nn import functional as F

from ..cells import CELLS, cell_of
from ..convert import convert

DEMO_CELLS = {"lstm": "lstm", "gru": "gru", "rnn": "rnn_tanh"}  # --cell (the book's names) -> fusedrnn.cells name


def class_name(cell):
    """The class name of the demo's `cell` in torch.nn and fusedrnn: LSTM, GRU, RNN."""
    return CELLS[DEMO_CELLS[cell]].nn_class.__name__


def make_rnn(cell, input_size, hidden_size, num_layers, fused=True, backend="auto"):
    """The demo's `cell` as fusedrnn's module running `backend` when `fused`, else torch.nn's (sequence-first);
    the same weights either way from the same seed (fusedrnn.convert keeps torch.nn's initialisation)."""
    spec = CELLS[DEMO_CELLS[cell]]
    rnn = spec.nn_class(input_size, hidden_size, num_layers, **spec.nn_kwargs)
    if not fused:
        return rnn
    return convert(rnn, backend)


class CharLM(nn.Module):
    """Next-character logits for every position of a batch of character sequences."""

    def __init__(self, rnn, vocab_size):
        super().__init__()
        self.rnn = rnn
        self.vocab_size = vocab_size
        self.linear = nn.Linear(rnn.hidden_size, vocab_size)

    def forward(self, inputs, state):
        """inputs: (B, T) token indices; state: (L, B, H), or a pair of them for an LSTM.

        Returns logits (T*B, V), time-major like the book's targets `Y.T.reshape(-1)`, and the new state.
        """
        x = F.one_hot(inputs.T.long(), self.vocab_size).to(torch.float32)
        y, state = self.rnn(x, state)
        return self.linear(y.reshape(-1, y.shape[-1])), state

    def begin_state(self, batch_size, device):
        """Zero state: (L, B, H), or (h, c) for an LSTM."""
        zeros = torch.zeros(self.rnn.num_layers, batch_size, self.rnn.hidden_size, device=device)
        return (zeros, zeros.clone()) if CELLS[cell_of(self.rnn)].has_c else zeros
