"""What every backend computes around its recurrence, as whole-sequence GEMMs: one implementation, used by the
reference, Triton and CUDA backends (the CPU backend fuses the same steps into its C++ driver and follows the same
block rule: tests/test_cpp.py pins it).

Before the recurrence:  Gx = x W_ih^T + b_ih for every step at once.
After the BPTT loop, from the gate gradients it produced:
  dx     = dGx W_ih                       dW_ih = sum over (t, b) of dGx^T x
  dW_hh  = sum of dGh^T h_{t-1}           db_ih = sum of dGx,  db_hh = sum of dGh
  dW_hr  = sum of dh_t^T (o * tanh(c_t))  (LSTM with projection; dh_t before the projection's transpose)
dGh is dGx except for the GRU, whose n row differs on the hidden side (r multiplies Bh_n).

The weight sums run over T*B rows. One float32 GEMM over all of them accumulates rounding error ~ sqrt(T*B) eps
(3e-6 relative at T*B = 40,000, 8x torch.nn's); GEMMs over blocks of BLOCK_ROWS rows summed in float64 keep it at
one block's. Half precision keeps one GEMM: it accumulates in float32 already.
"""

import torch

from .cells import CELLS, LayerWeights

BLOCK_ROWS = 2048  # rows per float32 GEMM: one block for the book model (T*B = 1,120); csrc/cpu keeps the same


def input_projection(x, w_ih, b_ih):
    """x: (T, B, I), w_ih: (G*H, I), b_ih: (G*H,) or None -> (T, B, G*H): x W_ih^T + b_ih, one GEMM for all steps."""
    T, B, I = x.shape
    flat = x.reshape(T * B, I)
    out = torch.addmm(b_ih, flat, w_ih.t()) if b_ih is not None else flat @ w_ih.t()
    return out.view(T, B, w_ih.shape[0])


def previous(seq, first, reverse):
    """The state each step starts from: seq shifted one step against the direction, ``first`` at the start.

    seq: (T, B, K) states after each step; first: (B, K) -> (T, B, K), a fresh tensor."""
    if reverse:
        return torch.cat((seq[1:], first.unsqueeze(0)), dim=0)
    return torch.cat((first.unsqueeze(0), seq[:-1]), dim=0)


def layer_input(x, ys, masks, layer):
    """What layer ``layer`` of a stack reads: x: (T, B, I), or the layer below's output ys[layer - 1]: (T, B, P)
    times its dropout mask masks[layer - 1] (masks empty without dropout)."""
    if layer == 0:
        return x
    return ys[layer - 1] * masks[layer - 1] if masks else ys[layer - 1]


def _flat(t):
    return t.reshape(-1, t.shape[-1])


def row_blocks(rows):
    """The float32 block rule: ceil(rows / BLOCK_ROWS) blocks of equal shares, block k = [rows*k/n, rows*(k+1)/n).
    csrc/cpu/ splits the same way (its ``share``)."""
    n = -(-rows // BLOCK_ROWS)
    return [(rows * k // n, rows * (k + 1) // n) for k in range(n)]


def sum_of_outer(a, b):
    """a: (T, B, M), b: (T, B, N) -> (M, N) = sum over every (t, b) row of a^T b, in a's dtype; float32 as GEMMs
    over ``row_blocks`` summed in float64 (module docstring)."""
    a, b = _flat(a), _flat(b)
    if a.shape[0] <= BLOCK_ROWS or a.dtype != torch.float32:
        return a.t() @ b
    total = torch.zeros(a.shape[1], b.shape[1], dtype=torch.float64, device=a.device)
    for begin, end in row_blocks(a.shape[0]):
        total += a[begin:end].t() @ b[begin:end]
    return total.to(a.dtype)


def weight_grads(cell, x, h_prev, saved, weights, dgx, dgh, dhy, need_dx=True):
    """The epilogue of a layer's backward (module docstring) -> (dx or None, LayerWeights of gradients).

    x: (T, B, I)   h_prev: (T, B, P) the state each step started from   saved: (T, B, saved_rows*H) (cells.py)
    weights: LayerWeights   dgx, dgh: (T, B, G*H) gate gradients, input and hidden side (the same tensor but for
    the GRU)   dhy: (T, B, P) dL/dh_t at valid steps (zero elsewhere) for dW_hr, or None without projection
    need_dx: False when x needs no gradient (dx is then None and not computed)."""
    dx = (_flat(dgx) @ weights.w_ih).view_as(x) if need_dx else None
    dw_hr = None
    if weights.w_hr is not None:
        H = weights.hidden_size(cell)
        o, c = saved[:, :, 3 * H : 4 * H], saved[:, :, 4 * H :]  # lstm's saved rows: i, f, g, o, c
        dw_hr = sum_of_outer(dhy, o * c.tanh())
    grads = LayerWeights(
        w_ih=sum_of_outer(dgx, x),
        w_hh=sum_of_outer(dgh, h_prev),
        b_ih=_flat(dgx).sum(0) if weights.b_ih is not None else None,
        b_hh=_flat(dgh).sum(0) if weights.b_hh is not None else None,
        w_hr=dw_hr,
    )
    return dx, grads


assert CELLS["lstm"].saved_rows == 5  # weight_grads reads lstm's o and c rows at 3H and 4H
