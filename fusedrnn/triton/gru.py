"""GRU recurrence (torch's reset-gate form) as one persistent Triton launch per layer-direction.

Forward, gate rows r, z, n (s = sigmoid; valid[b] = t < lengths[b]; holding is a select):
    A_t = x_t W_ih^T + b_ih                       (all steps at once: one cuBLAS GEMM before the launch)
    Bh  = h_{t-1} W_hh^T + b_hh;   r = s(A_r + Bh_r);   z = s(A_z + Bh_z);   n = tanh(A_n + r Bh_n)
    h_t = valid ? n + z (h_{t-1} - n) : h_{t-1}   (r multiplies Bh_n with its bias, as torch does)
Backward, in reverse time (dh carried in fp32):
    dh_t = dh + (valid ? dy_t : 0);   dn = dh_t (1-z)(1-n^2);   dz = dh_t (h_{t-1} - n) z(1-z);   dr = dn Bh_n r(1-r)
    input side dA = (dr, dz, dn), hidden side dBh = (dr, dz, dn r), both 0 where not valid
    dh_{t-1} = valid ? dBh W_hh + z dh_t : dh_t
    then dx, dW_ih, dW_hh, db as torch GEMMs over all steps (epilogue.weight_grads).

Per step the forward has one phase over H tiles; the backward three (dh_t, gate grads, dh_{t-1}),
separated by tl.debug_barrier() because each reads rows that other threads of the program wrote.

Saved for backward: saved (T, B, 4H), x's dtype, every backend's layout (cells.py): r, z, n and Bh_n.
y doubles as the h sequence. No output aliases an input or another output.
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
    hidden_preact,
    load_tile,
    own_range,
    sigmoid,
    store_held,
    store_tile,
    tanh,
    time_index,
)


@triton.jit(do_not_specialize=STEP_RANGE)
def gru_forward_kernel(
    gx_ptr,  # (T, B, 3H) x W_ih^T + b_ih, x's dtype
    h0_ptr,  # (B, H)
    w_hh_ptr,  # (3H, H)
    b_hh_ptr,  # (3H,), read only if HAS_BIAS
    len_ptr,  # (B,) int64, read only if HAS_LENGTHS
    y_ptr,  # out (T, B, H): h_t (held)
    saved_ptr,  # out (T, B, 4H): r, z, n, Bh_n
    T, B, H,
    s_begin, s_end, phases, span,  # steps, phases (UNITS) and units per program: see common.launch
    REVERSE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows, row_ok, lens = batch_tile(len_ptr, T, B, HAS_LENGTHS, BLOCK_B)
    for s in range(s_begin, s_end):
        t, valid, h_prev = forward_step(s, T, B, H, lens, row_ok, h0_ptr, y_ptr, REVERSE)
        gx_t = gx_ptr + t * B * 3 * H
        saved_t = saved_ptr + t * B * 4 * H
        lo, hi = own_range(H, span, phases, UNITS, BLOCK_N)
        for n0 in range(lo, hi, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < H
            bh_r = hidden_preact(0, h_prev, w_hh_ptr, b_hh_ptr, rows, row_ok, cols, col_ok, H, H, HAS_BIAS,
                                 PRECISION, BLOCK_B, BLOCK_N, BLOCK_K)
            bh_z = hidden_preact(1, h_prev, w_hh_ptr, b_hh_ptr, rows, row_ok, cols, col_ok, H, H, HAS_BIAS,
                                 PRECISION, BLOCK_B, BLOCK_N, BLOCK_K)
            bh_n = hidden_preact(2, h_prev, w_hh_ptr, b_hh_ptr, rows, row_ok, cols, col_ok, H, H, HAS_BIAS,
                                 PRECISION, BLOCK_B, BLOCK_N, BLOCK_K)
            r = sigmoid(load_tile(gx_t, 3 * H, rows, row_ok, cols, col_ok) + bh_r)
            z = sigmoid(load_tile(gx_t + H, 3 * H, rows, row_ok, cols, col_ok) + bh_z)
            n = tanh(load_tile(gx_t + 2 * H, 3 * H, rows, row_ok, cols, col_ok) + r * bh_n)
            h_old = load_tile(h_prev, H, rows, row_ok, cols, col_ok)
            store_tile(saved_t, 4 * H, rows, row_ok, cols, col_ok, r)
            store_tile(saved_t + H, 4 * H, rows, row_ok, cols, col_ok, z)
            store_tile(saved_t + 2 * H, 4 * H, rows, row_ok, cols, col_ok, n)
            store_tile(saved_t + 3 * H, 4 * H, rows, row_ok, cols, col_ok, bh_n)
            store_held(y_ptr + t * B * H, h_prev, H, rows, row_ok, cols, col_ok, valid, n + z * (h_old - n))
        tl.debug_barrier()


@triton.jit(do_not_specialize=STEP_RANGE)
def gru_backward_kernel(
    saved_ptr,  # (T, B, 4H) from the forward
    h0_ptr,  # (B, H)
    y_ptr,  # (T, B, H) from the forward
    w_hh_ptr,  # (3H, H)
    len_ptr,  # (B,) int64, read only if HAS_LENGTHS
    dy_ptr,  # (T, B, H)
    dgx_ptr,  # out (T, B, 3H) x's dtype: input-side gate grads dA (0 at padded steps)
    dgh_ptr,  # out (T, B, 3H) x's dtype: hidden-side gate grads dBh (0 at padded steps)
    dh_buf_ptr,  # (2, B, H) fp32 ping-pong dh; plane 0 holds dh_n
    dht_ptr,  # (B, H) fp32 scratch: dh_t of the current step
    T, B, H,
    s_begin, s_end, phases, span,  # steps, phases (DH, UNITS, CARRY) and units per program: see common.launch
    REVERSE: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows, row_ok, lens = batch_tile(len_ptr, T, B, HAS_LENGTHS, BLOCK_B)
    for s in range(s_begin, s_end):
        k, t, valid = backward_step(s, T, B, H, lens, rows, row_ok, dh_buf_ptr, dy_ptr, dht_ptr, dht_ptr, phases, span,
                                    False, REVERSE, BLOCK_N)
        keep = valid[:, None]
        saved_t = saved_ptr + t * B * 4 * H
        dgx_t = dgx_ptr + t * B * 3 * H
        dgh_t = dgh_ptr + t * B * 3 * H
        h_prev = tl.where(k == 0, h0_ptr, y_ptr + time_index(k - 1, T, REVERSE) * B * H)
        lo, hi = own_range(H, span, phases, UNITS, BLOCK_N)
        for n0 in range(lo, hi, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < H
            dh = load_tile(dht_ptr, H, rows, row_ok, cols, col_ok)
            r = load_tile(saved_t, 4 * H, rows, row_ok, cols, col_ok)
            z = load_tile(saved_t + H, 4 * H, rows, row_ok, cols, col_ok)
            n = load_tile(saved_t + 2 * H, 4 * H, rows, row_ok, cols, col_ok)
            bh_n = load_tile(saved_t + 3 * H, 4 * H, rows, row_ok, cols, col_ok)
            h_old = load_tile(h_prev, H, rows, row_ok, cols, col_ok)
            dn = dh * ((1.0 - z) * (1.0 - n * n))  # bounded factors first, as in lstm.py
            dz = tl.where(keep, dh * (z * (1.0 - z)) * (h_old - n), 0.0)
            dr = tl.where(keep, dn * (r * (1.0 - r)) * bh_n, 0.0)
            dn = tl.where(keep, dn, 0.0)
            store_tile(dgx_t, 3 * H, rows, row_ok, cols, col_ok, dr)
            store_tile(dgh_t, 3 * H, rows, row_ok, cols, col_ok, dr)
            store_tile(dgx_t + H, 3 * H, rows, row_ok, cols, col_ok, dz)
            store_tile(dgh_t + H, 3 * H, rows, row_ok, cols, col_ok, dz)
            store_tile(dgx_t + 2 * H, 3 * H, rows, row_ok, cols, col_ok, dn)
            store_tile(dgh_t + 2 * H, 3 * H, rows, row_ok, cols, col_ok, dn * r)
        tl.debug_barrier()
        carry_hidden_grad(dgh_t, 3 * H, w_hh_ptr, dht_ptr, saved_t + H, 4 * H, dh_buf_ptr + ((s + 1) % 2) * B * H,
                          valid, rows, row_ok, H, span, phases, True, PRECISION, BLOCK_B, BLOCK_N, BLOCK_K)
        tl.debug_barrier()


def forward(cell, x, h0, c0, weights, lengths, reverse):
    """The backend contract's forward for cell "gru" (see fusedrnn/reference.py): (y, h_n, None, saved)."""
    T, B, _ = x.shape
    H = weights.hidden_size(cell)
    common.check_sizes(B, (saved_shape(cell, T, B, H)[2],), weights)
    h0, w_hh, b_hh = common.dense(h0, weights.w_hh, weights.b_hh)
    gx = input_projection(x, weights.w_ih, weights.b_ih)
    y = x.new_empty(T, B, H)
    saved = x.new_empty(saved_shape(cell, T, B, H))
    args = (gx, h0, w_hh, common.stand_in(b_hh, w_hh), common.stand_in(lengths, h0), y, saved, T, B, H)
    common.launch(gru_forward_kernel, x, H, args, [(common.UNITS, H)], common.split(x, H, H, cell), REVERSE=reverse,
                  HAS_BIAS=b_hh is not None, HAS_LENGTHS=lengths is not None)
    return y, y[0 if reverse else T - 1].clone(), None, saved


def backward(cell, x, h0, c0, weights, lengths, reverse, y, saved, dy, dh_n, dc_n, need_dx=True):
    """The backend contract's backward for cell "gru": (dx, dh0, None, dweights)."""
    T, B, _ = x.shape
    H = weights.hidden_size(cell)
    h0, y, saved, w_hh, dy = common.dense(h0, y, saved, weights.w_hh, dy)
    dgx, dgh = x.new_empty(T, B, 3 * H), x.new_empty(T, B, 3 * H)
    dh_buf = common.state_buffer(dh_n)
    dht = dh_buf.new_empty(B, H)
    args = (saved, h0, y, w_hh, common.stand_in(lengths, h0), dy, dgx, dgh, dh_buf, dht, T, B, H)
    phases = [(common.DH, H), (common.UNITS, H), (common.CARRY, H)]
    common.launch(gru_backward_kernel, x, H, args, phases, common.split(x, H, H, cell), REVERSE=reverse,
                  HAS_LENGTHS=lengths is not None)
    dh0 = common.final_state(dh_buf, T, x.dtype)
    dx, dweights = weight_grads(cell, x, previous(y, h0, reverse), saved, weights, dgx, dgh, None, need_dx)
    return dx, dh0, None, dweights
