"""LSTM recurrence (optionally with projection) as one persistent Triton launch per layer-direction.

Forward, torch.nn's math with gate rows i, f, g, o (s = sigmoid, every state update a select on `valid`,
valid[b] = t < lengths[b]):
    gx_t = x_t W_ih^T + b_ih                      (all steps at once: one cuBLAS GEMM before the launch)
    G    = gx_t + h_{t-1} W_hh^T + b_hh;   i, f, o = s(G_i), s(G_f), s(G_o);   g = tanh(G_g)
    c_t  = valid ? f c_{t-1} + i g : c_{t-1}
    h_t  = valid ? o tanh(c_t) : h_{t-1}          [proj: cell_out = o tanh(c_t) over all H, h_t = cell_out W_hr^T]
Backward, in reverse time (dh, dc carried in fp32):
    dh_t = dh + (valid ? dy_t : 0);   dr = dh_t  [proj: dh_t W_hr];   dc~ = dc + dr o (1 - tanh(c_t)^2)
    dG   = valid ? (dc~ g i(1-i), dc~ c_{t-1} f(1-f), dc~ i(1-g^2), dr tanh(c_t) o(1-o)) : 0
    dc_{t-1} = valid ? dc~ f : dc;   dh_{t-1} = valid ? dG W_hh : dh_t
    then dx, dW_ih, dW_hh, db, dW_hr as torch GEMMs over all steps (epilogue.weight_grads).
Gate-derivative products multiply the bounded factors first and unbounded states (c_{t-1}) last, as the
reference does, so a saturated gate's exact 0 cannot meet an overflowed product (inf * 0 = NaN).

Per step the forward has one phase over H tiles (gates, c, and h or r) and, with projection, a second over
P tiles (h = r W_hr^T); the backward has three: dh_t over P tiles, dG over H tiles, dh_{t-1} over P tiles.
Phases are separated by tl.debug_barrier() because each reads rows that other threads of the program wrote.

Saved for backward: saved (T, B, 5H), x's dtype, every backend's layout (cells.py): activated i, f, g, o, and c_t
(held). y doubles as the h sequence. No output aliases an input or another output.
"""

import triton
import triton.language as tl

from ..cells import saved_shape
from ..epilogue import input_projection, previous, weight_grads
from . import common
from .common import (
    OUTS,
    STEP_RANGE,
    UNITS,
    backward_step,
    batch_tile,
    carry_hidden_grad,
    forward_step,
    gate_preact,
    load_tile,
    own_range,
    sigmoid,
    store_held,
    store_tile,
    tanh,
    tile_matmul,
    time_index,
)


@triton.jit(do_not_specialize=STEP_RANGE)
def lstm_forward_kernel(
    gx_ptr,  # (T, B, 4H) x W_ih^T + b_ih, x's dtype
    h0_ptr,  # (B, P)
    w_hh_ptr,  # (4H, P)
    b_hh_ptr,  # (4H,), read only if HAS_BIAS
    w_hr_ptr,  # (P, H), read only if HAS_PROJ
    len_ptr,  # (B,) int64, read only if HAS_LENGTHS
    y_ptr,  # out (T, B, P): h_t (held)
    saved_ptr,  # out (T, B, 5H): i, f, g, o, c_t (held)
    c_buf_ptr,  # (2, B, H) fp32 ping-pong cell state; plane 0 holds c0
    cell_out_ptr,  # (B, H) x's dtype: o tanh(c_t) of the current step, only if HAS_PROJ
    T, B, H, P,
    s_begin, s_end, phases, span,  # steps, phases (UNITS, OUTS) and units per program: see common.launch
    REVERSE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_PROJ: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows, row_ok, lens = batch_tile(len_ptr, T, B, HAS_LENGTHS, BLOCK_B)
    for s in range(s_begin, s_end):
        t, valid, h_prev = forward_step(s, T, B, P, lens, row_ok, h0_ptr, y_ptr, REVERSE)
        keep = valid[:, None]
        c_prev = c_buf_ptr + (s % 2) * B * H
        c_next = c_buf_ptr + ((s + 1) % 2) * B * H
        gx_t = gx_ptr + t * B * 4 * H
        saved_t = saved_ptr + t * B * 5 * H
        y_t = y_ptr + t * B * P
        lo, hi = own_range(H, span, phases, UNITS, BLOCK_N)
        for n0 in range(lo, hi, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < H
            i = sigmoid(gate_preact(0, 4, gx_t, h_prev, w_hh_ptr, b_hh_ptr, rows, row_ok, cols, col_ok, H, P,
                                    HAS_BIAS, PRECISION, BLOCK_B, BLOCK_N, BLOCK_K))
            f = sigmoid(gate_preact(1, 4, gx_t, h_prev, w_hh_ptr, b_hh_ptr, rows, row_ok, cols, col_ok, H, P,
                                    HAS_BIAS, PRECISION, BLOCK_B, BLOCK_N, BLOCK_K))
            g = tanh(gate_preact(2, 4, gx_t, h_prev, w_hh_ptr, b_hh_ptr, rows, row_ok, cols, col_ok, H, P,
                                 HAS_BIAS, PRECISION, BLOCK_B, BLOCK_N, BLOCK_K))
            o = sigmoid(gate_preact(3, 4, gx_t, h_prev, w_hh_ptr, b_hh_ptr, rows, row_ok, cols, col_ok, H, P,
                                    HAS_BIAS, PRECISION, BLOCK_B, BLOCK_N, BLOCK_K))
            c_old = load_tile(c_prev, H, rows, row_ok, cols, col_ok)
            c_new = f * c_old + i * g
            c = tl.where(keep, c_new, c_old)
            store_tile(c_next, H, rows, row_ok, cols, col_ok, c)
            store_tile(saved_t, 5 * H, rows, row_ok, cols, col_ok, i)
            store_tile(saved_t + H, 5 * H, rows, row_ok, cols, col_ok, f)
            store_tile(saved_t + 2 * H, 5 * H, rows, row_ok, cols, col_ok, g)
            store_tile(saved_t + 3 * H, 5 * H, rows, row_ok, cols, col_ok, o)
            store_tile(saved_t + 4 * H, 5 * H, rows, row_ok, cols, col_ok, c)
            out = o * tanh(c_new)
            if HAS_PROJ:
                store_tile(cell_out_ptr, H, rows, row_ok, cols, col_ok, out)
            else:
                store_held(y_t, h_prev, P, rows, row_ok, cols, col_ok, valid, out)
        tl.debug_barrier()
        if HAS_PROJ:
            lo, hi = own_range(P, span, phases, OUTS, BLOCK_N)
            for p0 in range(lo, hi, BLOCK_N):
                cols = p0 + tl.arange(0, BLOCK_N)
                col_ok = cols < P
                h_new = tile_matmul(cell_out_ptr, H, w_hr_ptr, 1, H, rows, row_ok, cols, col_ok, H,
                                    PRECISION, BLOCK_B, BLOCK_N, BLOCK_K)
                store_held(y_t, h_prev, P, rows, row_ok, cols, col_ok, valid, h_new)
            tl.debug_barrier()


@triton.jit(do_not_specialize=STEP_RANGE)
def lstm_backward_kernel(
    saved_ptr,  # (T, B, 5H) from the forward
    c0_ptr,  # (B, H)
    w_hh_ptr,  # (4H, P)
    w_hr_ptr,  # (P, H), read only if HAS_PROJ
    len_ptr,  # (B,) int64, read only if HAS_LENGTHS
    dy_ptr,  # (T, B, P)
    dg_ptr,  # out (T, B, 4H) x's dtype: gate pre-activation grads (0 at padded steps)
    dhy_ptr,  # out (T, B, P) x's dtype: dL/dh_t (0 at padded steps), only if HAS_PROJ
    dh_buf_ptr,  # (2, B, P) fp32 ping-pong dh; plane 0 holds dh_n
    dc_buf_ptr,  # (2, B, H) fp32 ping-pong dc; plane 0 holds dc_n
    dht_ptr,  # (B, P) fp32 scratch: dh_t of the current step
    T, B, H, P,
    s_begin, s_end, phases, span,  # steps, phases (DH, UNITS, CARRY) and units per program: see common.launch
    REVERSE: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_PROJ: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows, row_ok, lens = batch_tile(len_ptr, T, B, HAS_LENGTHS, BLOCK_B)
    for s in range(s_begin, s_end):
        k, t, valid = backward_step(s, T, B, P, lens, rows, row_ok, dh_buf_ptr, dy_ptr, dht_ptr, dhy_ptr, phases, span,
                                    HAS_PROJ, REVERSE, BLOCK_N)
        keep = valid[:, None]
        saved_t = saved_ptr + t * B * 5 * H
        dg_t = dg_ptr + t * B * 4 * H
        c_prev = tl.where(k == 0, c0_ptr, saved_ptr + time_index(k - 1, T, REVERSE) * B * 5 * H + 4 * H)
        c_prev_stride = tl.where(k == 0, H, 5 * H)
        dc_in = dc_buf_ptr + (s % 2) * B * H
        dc_out = dc_buf_ptr + ((s + 1) % 2) * B * H
        lo, hi = own_range(H, span, phases, UNITS, BLOCK_N)
        for n0 in range(lo, hi, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < H
            if HAS_PROJ:
                dr = tile_matmul(dht_ptr, P, w_hr_ptr, H, 1, rows, row_ok, cols, col_ok, P,
                                 PRECISION, BLOCK_B, BLOCK_N, BLOCK_K)
            else:
                dr = load_tile(dht_ptr, P, rows, row_ok, cols, col_ok)
            i = load_tile(saved_t, 5 * H, rows, row_ok, cols, col_ok)
            f = load_tile(saved_t + H, 5 * H, rows, row_ok, cols, col_ok)
            g = load_tile(saved_t + 2 * H, 5 * H, rows, row_ok, cols, col_ok)
            o = load_tile(saved_t + 3 * H, 5 * H, rows, row_ok, cols, col_ok)
            tc = tanh(load_tile(saved_t + 4 * H, 5 * H, rows, row_ok, cols, col_ok))
            dc = load_tile(dc_in, H, rows, row_ok, cols, col_ok)
            dct = dc + dr * (o * (1.0 - tc * tc))
            c_old = load_tile(c_prev, c_prev_stride, rows, row_ok, cols, col_ok)
            store_tile(dg_t, 4 * H, rows, row_ok, cols, col_ok, tl.where(keep, dct * (i * (1.0 - i) * g), 0.0))
            store_tile(dg_t + H, 4 * H, rows, row_ok, cols, col_ok, tl.where(keep, dct * (f * (1.0 - f)) * c_old, 0.0))
            store_tile(dg_t + 2 * H, 4 * H, rows, row_ok, cols, col_ok, tl.where(keep, dct * (i * (1.0 - g * g)), 0.0))
            store_tile(dg_t + 3 * H, 4 * H, rows, row_ok, cols, col_ok, tl.where(keep, dr * (o * (1.0 - o) * tc), 0.0))
            store_tile(dc_out, H, rows, row_ok, cols, col_ok, tl.where(keep, dct * f, dc))
        tl.debug_barrier()
        carry_hidden_grad(dg_t, 4 * H, w_hh_ptr, dht_ptr, dht_ptr, P, dh_buf_ptr + ((s + 1) % 2) * B * P, valid,
                          rows, row_ok, P, span, phases, False, PRECISION, BLOCK_B, BLOCK_N, BLOCK_K)
        tl.debug_barrier()


def forward(cell, x, h0, c0, weights, lengths, reverse):
    """The backend contract's forward for cell "lstm" (see fusedrnn/reference.py): (y, h_n, c_n, saved)."""
    T, B, _ = x.shape
    H, P = weights.hidden_size(cell), h0.shape[1]
    common.check_sizes(B, (saved_shape(cell, T, B, H)[2], P), weights)
    h0, w_hh, b_hh, w_hr = common.dense(h0, weights.w_hh, weights.b_hh, weights.w_hr)
    gx = input_projection(x, weights.w_ih, weights.b_ih)
    y = x.new_empty(T, B, P)
    saved = x.new_empty(saved_shape(cell, T, B, H))
    c_buf = common.state_buffer(c0)
    cell_out = x.new_empty(B, H) if w_hr is not None else y
    args = (gx, h0, w_hh, common.stand_in(b_hh, w_hh), common.stand_in(w_hr, w_hh), common.stand_in(lengths, h0), y,
            saved, c_buf, cell_out, T, B, H, P)
    phases = [(common.UNITS, H)] + ([(common.OUTS, P)] if w_hr is not None else [])
    common.launch(lstm_forward_kernel, x, H, args, phases, common.split(x, H, P, cell), REVERSE=reverse,
                  HAS_BIAS=b_hh is not None, HAS_LENGTHS=lengths is not None, HAS_PROJ=w_hr is not None)
    last = 0 if reverse else T - 1
    return y, y[last].clone(), saved[last, :, 4 * H:].clone(), saved


def backward(cell, x, h0, c0, weights, lengths, reverse, y, saved, dy, dh_n, dc_n, need_dx=True):
    """The backend contract's backward for cell "lstm": (dx, dh0, dc0, dweights)."""
    T, B, _ = x.shape
    H, P = weights.hidden_size(cell), h0.shape[1]
    c0, saved, w_hh, w_hr, dy = common.dense(c0, saved, weights.w_hh, weights.w_hr, dy)
    dg = x.new_empty(T, B, 4 * H)
    dhy = x.new_empty(T, B, P) if w_hr is not None else None
    dh_buf, dc_buf = common.state_buffer(dh_n), common.state_buffer(dc_n)
    dht = dh_buf.new_empty(B, P)
    args = (saved, c0, w_hh, common.stand_in(w_hr, w_hh), common.stand_in(lengths, c0), dy, dg, common.stand_in(dhy, dg),
            dh_buf, dc_buf, dht, T, B, H, P)
    phases = [(common.DH, P), (common.UNITS, H), (common.CARRY, P)]
    common.launch(lstm_backward_kernel, x, H, args, phases, common.split(x, H, P, cell), REVERSE=reverse,
                  HAS_LENGTHS=lengths is not None, HAS_PROJ=w_hr is not None)
    dh0, dc0 = common.final_state(dh_buf, T, x.dtype), common.final_state(dc_buf, T, x.dtype)
    dx, dweights = weight_grads(cell, x, previous(y, h0, reverse), saved, weights, dg, dg, dhy, need_dx)
    return dx, dh0, dc0, dweights

