"""The cell table: every fact about a recurrent cell that code outside its kernels needs, in one place.

A cell is named by the lowercased ``mode`` of its torch.nn module: ``"lstm"``, ``"gru"``, ``"rnn_tanh"``,
``"rnn_relu"``. That name is the ``cell`` argument of every backend, op, test, benchmark and the demo.

  gates        G: W_ih and W_hh have G*H rows, gate blocks in torch.nn's order (lstm i, f, g, o; gru r, z, n)
  saved_rows   what forward saves for backward, in units of H per (step, batch row): the ``saved`` tensor is
               (T, B, saved_rows * H) (lstm: activated i, f, g, o and c_t; gru: r, z, n and Bh_n; rnn: none,
               tanh' and relu' follow from y). Every backend keeps this layout (csrc pins it, tests check it).
  has_c        the cell carries a cell state c beside h (LSTM's (h, c) tuple)
  nn_class     the torch.nn module class; ``nn_kwargs`` what its constructor needs to be this cell

Adding a cell: an entry here, its math in ``fusedrnn/reference.py``, its kernels (csrc/cpu, csrc/cuda,
fusedrnn/triton); nothing else restates these facts.

``LayerWeights`` bundles one layer-direction's parameters, in torch.nn's order:

  w_ih: (G*H, I)   w_hh: (G*H, P)   b_ih, b_hh: (G*H,) or None   w_hr: (P, H) for an LSTM with proj_size P, else None

(P = proj_size or H.) Gradients come back in the same bundle, None where the parameter is None. A module's
parameters as torch.nn lists them (``module._flat_weights``: layer-direction by layer-direction, each w_ih, w_hh[,
b_ih, b_hh][, w_hr]) become LayerWeights through ``flat_layer_weights``; csrc/cpu/binding.cpp reads the list alike.
"""

from typing import NamedTuple

from torch import Tensor, nn


class Cell(NamedTuple):
    name: str
    gates: int
    saved_rows: int
    has_c: bool
    nn_class: type
    nn_kwargs: dict


CELLS = {
    "lstm": Cell("lstm", 4, 5, True, nn.LSTM, {}),
    "gru": Cell("gru", 3, 4, False, nn.GRU, {}),
    "rnn_tanh": Cell("rnn_tanh", 1, 0, False, nn.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": Cell("rnn_relu", 1, 0, False, nn.RNN, {"nonlinearity": "relu"}),
}
CELL_NAMES = tuple(CELLS)


def gates(cell):
    """G of ``cell`` (a name from CELL_NAMES)."""
    return CELLS[cell].gates


def cell_of(module):
    """The cell name of a torch.nn.LSTM / GRU / RNN (or fused) module: its ``mode``, lowercased."""
    return module.mode.lower()


def saved_shape(cell, T, B, H):
    """Shape of the activations forward saves for backward (see ``saved_rows``); its dtype is x's."""
    return (T, B, CELLS[cell].saved_rows * H)


class LayerWeights(NamedTuple):
    """One layer-direction's parameters (shapes in the module docstring); None where absent."""

    w_ih: Tensor
    w_hh: Tensor
    b_ih: Tensor | None = None
    b_hh: Tensor | None = None
    w_hr: Tensor | None = None

    def hidden_size(self, cell):
        return self.w_hh.shape[0] // CELLS[cell].gates


def flat_layer_weights(flat, has_biases, count):
    """``count`` LayerWeights from torch.nn's flat parameter list (``module._flat_weights`` order; layer-direction k
    = layer * directions + direction). has_biases: the module's ``bias``; a trailing fifth / third entry is w_hr.
    A plain loop: modules.py runs this under torch.compile too, where Dynamo refused generator expressions."""
    per = len(flat) // count
    projected = per > (4 if has_biases else 2)
    layers = []
    for k in range(count):
        w = flat[k * per : (k + 1) * per]
        b_ih, b_hh = (w[2], w[3]) if has_biases else (None, None)
        layers.append(LayerWeights(w[0], w[1], b_ih, b_hh, w[-1] if projected else None))
    return layers
