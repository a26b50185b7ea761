"""Elman RNN recurrence (tanh or relu) as one persistent Triton launch per layer-direction.

Forward (valid[b] = t < lengths[b]; holding is a select):
    gx_t = x_t W_ih^T + b_ih                      (all steps at once: one cuBLAS GEMM before the launch)
    h_t  = valid ? act(gx_t + h_{t-1} W_hh^T + b_hh) : h_{t-1},   act = tanh | relu (NaN-propagating, as torch)
Backward, in reverse time (dh carried in fp32):
    dh_t = dh + (valid ? dy_t : 0);   dG = valid ? dh_t (1 - h_t^2) | (h_t <= 0 ? 0 : dh_t) : 0   (tanh | relu)
    dh_{t-1} = valid ? dG W_hh : dh_t
    then dx, dW_ih, dW_hh, db as torch GEMMs over all steps (epilogue.weight_grads).

Per step the forward has one phase over H tiles; the backward three (dh_t, dG, dh_{t-1}), separated by
tl.debug_barrier() because each reads rows that other threads of the program wrote.

Saved for backward: saved (T, B, 0), as in every backend: act' follows from y, which doubles as the h sequence.
No output aliases an input or another output.
"""

import triton
import triton.language as tl

from ..cells import saved_shape
from ..epilogue import input_projection, previous, weight_grads
from . import common
from .common import (
    STEP_RANGE,
    UNITS,
    backward_step,
    batch_tile,
    carry_hidden_grad,
    forward_step,
    gate_preact,
    load_tile,
    own_range,
    store_held,
    store_tile,
    tanh,
)


@triton.jit(do_not_specialize=STEP_RANGE)
def rnn_forward_kernel(
    gx_ptr,  # (T, B, H) x W_ih^T + b_ih, x's dtype
    h0_ptr,  # (B, H)
    w_hh_ptr,  # (H, H)
    b_hh_ptr,  # (H,), read only if HAS_BIAS
    len_ptr,  # (B,) int64, read only if HAS_LENGTHS
    y_ptr,  # out (T, B, H): h_t (held)
    T, B, H,
    s_begin, s_end, phases, span,  # steps, phases (UNITS) and units per program: see common.launch
    RELU: tl.constexpr, REVERSE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows, row_ok, lens = batch_tile(len_ptr, T, B, HAS_LENGTHS, BLOCK_B)
    for s in range(s_begin, s_end):
        t, valid, h_prev = forward_step(s, T, B, H, lens, row_ok, h0_ptr, y_ptr, REVERSE)
        lo, hi = own_range(H, span, phases, UNITS, BLOCK_N)
        for n0 in range(lo, hi, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < H
            pre = gate_preact(0, 1, gx_ptr + t * B * H, h_prev, w_hh_ptr, b_hh_ptr, rows, row_ok, cols, col_ok, H, H,
                              HAS_BIAS, PRECISION, BLOCK_B, BLOCK_N, BLOCK_K)
            if RELU:
                h_new = tl.where(pre < 0.0, 0.0, pre)  # relu(NaN) = NaN, as torch (a select keeps NaN)
            else:
                h_new = tanh(pre)
            store_held(y_ptr + t * B * H, h_prev, H, rows, row_ok, cols, col_ok, valid, h_new)
        tl.debug_barrier()


@triton.jit(do_not_specialize=STEP_RANGE)
def rnn_backward_kernel(
    y_ptr,  # (T, B, H) from the forward
    w_hh_ptr,  # (H, H)
    len_ptr,  # (B,) int64, read only if HAS_LENGTHS
    dy_ptr,  # (T, B, H)
    dg_ptr,  # out (T, B, H) x's dtype: pre-activation grads (0 at padded steps)
    dh_buf_ptr,  # (2, B, H) fp32 ping-pong dh; plane 0 holds dh_n
    dht_ptr,  # (B, H) fp32 scratch: dh_t of the current step
    T, B, H,
    s_begin, s_end, phases, span,  # steps, phases (DH, UNITS, CARRY) and units per program: see common.launch
    RELU: tl.constexpr, REVERSE: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows, row_ok, lens = batch_tile(len_ptr, T, B, HAS_LENGTHS, BLOCK_B)
    for s in range(s_begin, s_end):
        _, t, valid = backward_step(s, T, B, H, lens, rows, row_ok, dh_buf_ptr, dy_ptr, dht_ptr, dht_ptr, phases, span,
                                    False, REVERSE, BLOCK_N)
        lo, hi = own_range(H, span, phases, UNITS, BLOCK_N)
        for n0 in range(lo, hi, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < H
            dh = load_tile(dht_ptr, H, rows, row_ok, cols, col_ok)
            h = load_tile(y_ptr + t * B * H, H, rows, row_ok, cols, col_ok)
            if RELU:
                dg = tl.where(h <= 0.0, 0.0, dh)  # torch's relu backward: a NaN h passes dh on
            else:
                dg = dh * (1.0 - h * h)
            store_tile(dg_ptr + t * B * H, H, rows, row_ok, cols, col_ok, tl.where(valid[:, None], dg, 0.0))
        tl.debug_barrier()
        carry_hidden_grad(dg_ptr + t * B * H, H, w_hh_ptr, dht_ptr, dht_ptr, H, dh_buf_ptr + ((s + 1) % 2) * B * H,
                          valid, rows, row_ok, H, span, phases, False, PRECISION, BLOCK_B, BLOCK_N, BLOCK_K)
        tl.debug_barrier()


def forward(cell, x, h0, c0, weights, lengths, reverse):
    """The backend contract's forward for "rnn_tanh" / "rnn_relu" (see fusedrnn/reference.py): (y, h_n, None, saved)."""
    T, B, _ = x.shape
    H = weights.hidden_size(cell)
    common.check_sizes(B, (H,), weights)
    h0, w_hh, b_hh = common.dense(h0, weights.w_hh, weights.b_hh)
    gx = input_projection(x, weights.w_ih, weights.b_ih)
    y = x.new_empty(T, B, H)
    args = (gx, h0, w_hh, common.stand_in(b_hh, w_hh), common.stand_in(lengths, h0), y, T, B, H)
    common.launch(rnn_forward_kernel, x, H, args, [(common.UNITS, H)], common.split(x, H, H, cell),
                  RELU=cell == "rnn_relu", REVERSE=reverse, HAS_BIAS=b_hh is not None, HAS_LENGTHS=lengths is not None)
    return y, y[0 if reverse else T - 1].clone(), None, x.new_empty(saved_shape(cell, T, B, H))


def backward(cell, x, h0, c0, weights, lengths, reverse, y, saved, dy, dh_n, dc_n, need_dx=True):
    """The backend contract's backward for the RNN cells: (dx, dh0, None, dweights)."""
    T, B, _ = x.shape
    H = weights.hidden_size(cell)
    y, w_hh, dy = common.dense(y, weights.w_hh, dy)
    dg = x.new_empty(T, B, H)
    dh_buf = common.state_buffer(dh_n)
    dht = dh_buf.new_empty(B, H)
    args = (y, w_hh, common.stand_in(lengths, y), dy, dg, dh_buf, dht, T, B, H)
    phases = [(common.DH, H), (common.UNITS, H), (common.CARRY, H)]
    common.launch(rnn_backward_kernel, x, H, args, phases, common.split(x, H, H, cell), RELU=cell == "rnn_relu",
                  REVERSE=reverse, HAS_LENGTHS=lengths is not None)
    dh0 = common.final_state(dh_buf, T, x.dtype)
    dx, dweights = weight_grads(cell, x, previous(y, h0, reverse), saved, weights, dg, dg, None, need_dx)
    return dx, dh0, None, dweights
