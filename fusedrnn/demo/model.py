"""The character language model of the d2l book: one-hot input -> stacked RNN -> Linear on every step.

`CharLM` has the attribute names of the book's `RNNModel` (`rnn`, `linear`), so its state_dict loads
into that model, and a fusedrnn model's state_dict loads into the torch.nn one and back.
"""
import torch
from torch import nn
from torch.nn import functional as F

CELLS = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}


def make_rnn(cell, input_size, hidden_size, num_layers, fused=True, backend="auto"):
    """fusedrnn.<CELL> running `backend` when `fused`, else the torch.nn class (sequence-first)."""
    if not fused:
        return getattr(nn, CELLS[cell])(input_size, hidden_size, num_layers)
    import fusedrnn
    return getattr(fusedrnn, CELLS[cell])(input_size, hidden_size, num_layers, backend=backend)


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
        return (zeros, zeros.clone()) if isinstance(self.rnn, nn.LSTM) else zeros
