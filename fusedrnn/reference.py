"""Pure-PyTorch backend: the specification every fused backend implements, and the test oracle.

One call runs ONE layer in ONE direction over a whole sequence. The math, in torch.nn's conventions
(gate rows in the order given; ``s`` is the logistic sigmoid; all products are row-vector times W^T):

  lstm      (i, f, g, o):  G = x W_ih^T + b_ih + h W_hh^T + b_hh
                           i, f, o = s(G_i), s(G_f), s(G_o);  g = tanh(G_g)
                           c' = f * c + i * g;  h' = o * tanh(c')      [with proj: h' = (o * tanh(c')) W_hr^T]
  gru       (r, z, n):     A = x W_ih^T + b_ih;  Bh = h W_hh^T + b_hh
                           r = s(A_r + Bh_r);  z = s(A_z + Bh_z);  n = tanh(A_n + r * Bh_n)
                           h' = (1 - z) * n + z * h                    [r multiplies Bh_n, bias included]
  rnn_tanh / rnn_relu:     h' = tanh|relu(x W_ih^T + b_ih + h W_hh^T + b_hh)

Variable lengths (PackedSequence): sequence b only has steps t < lengths[b]. At a step outside it the
state is HELD (h' = h, c' = c), so in the reverse direction the held value is h0 until the sequence
starts. y[t] is the state after step t, held value included; callers must ignore y at padded steps and
backward ignores dy there. Holding (a select, never a multiply) keeps NaN/Inf of padding out.

Backend contract (``fusedrnn/ops.py`` is the only caller; every backend module exposes these three):

  forward(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, save=True) -> (y, h_n, c_n, ws)
  backward(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, y, ws, dy, dh_n, dc_n, need_dx=True)
      -> (dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr); dx is None without need_dx (x needs no gradient)
  workspace_shape(mode, T, B, H, P) -> shape of ws (its dtype is x's)

  mode: "lstm" | "gru" | "rnn_tanh" | "rnn_relu";  G gates: 4 | 3 | 1;  P = proj_size or H
  x: (T, B, I) contiguous, time-major     h0: (B, P)     c0: (B, H) for lstm, else None
  w_ih: (G*H, I)   w_hh: (G*H, P)   b_ih, b_hh: (G*H,) or None   w_hr: (P, H) for lstm with proj, else None
  lengths: (B,) int64 on x's device, or None (every sequence has T steps)
  reverse: run t = T-1 .. 0
  y: (T, B, P)   h_n: (B, P)   c_n: (B, H) or None
  ws: backend-private activations saved for ITS backward; opaque to everyone else. save=False says no
      backward follows (inference): ws is then an empty (0,) tensor and need not be computed.
  dy: (T, B, P)  dh_n: (B, P)  dc_n: (B, H) or None; every gradient has its tensor's shape, None where
  the tensor is None.
Outputs are fresh tensors: none aliases an input or another output (torch.library's rule).

A backend that can run several layers at once (the CUDA backend's wavefront) also exposes the stack contract,
L unidirectional layers with dropout between them in one call; ops.py uses it for such stacks where the
backend has it, one forward call per layer otherwise:

  stack_forward(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, masks, lengths, save=True) -> (ys, h_n, c_n, ws)
  stack_backward(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, masks, lengths, ys, ws, dys, dh_n, dc_n,
                 need_dx=True) -> (dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr)

  x: (T, B, I)   h0: (L, B, P)   c0: (L, B, H) or None
  w_ih, w_hh: lists of L (layer l's as above; layer l > 0 has input size P);  b_ih, b_hh, w_hr: lists of L,
      or empty lists where absent
  masks: list of L - 1 (T, B, P) tensors, or empty: layer l + 1 reads layer l's output times masks[l]
      (dropout's mask, 1/(1-p) scale included)
  ys: (L, T, B, P) every layer's output (ys[L-1] is the stack's)   h_n: (L, B, P)   c_n: (L, B, H) or None
  ws: (L, *workspace_shape) or (0,) without save   dys, dh_n, dc_n: like ys, h_n, c_n
  the gradients of lists are lists (empty where the list is); dx is None without need_dx

This backend's ws: lstm (T, B, 5H) = activated i, f, g, o and c_t (held); gru (T, B, 4H) = r, z, n and
Bh_n; rnn (T, B, 0) (tanh' and relu' follow from y). Backward is hand-written BPTT: one GEMM per step
for dh_{t-1}, then the weight and input gradients as GEMMs over the whole sequence.
"""

import torch

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
_WS_GATES = {"lstm": 5, "gru": 4, "rnn_tanh": 0, "rnn_relu": 0}


def workspace_shape(mode, T, B, H, P):
    return (T, B, _WS_GATES[mode] * H)


def unavailable_reason(device, dtype, mode):
    """Why this backend cannot run for (device, dtype, mode), or None. The reference runs everywhere."""
    return


def _time_order(T, reverse):
    return range(T - 1, -1, -1) if reverse else range(T)


def _input_projection(x, w_ih, b_ih):
    """x: (T, B, I) -> (T, B, G*H): x W_ih^T + b_ih for every step in one GEMM."""
    T, B, I = x.shape
    flat = x.reshape(T * B, I)
    out = torch.addmm(b_ih, flat, w_ih.t()) if b_ih is not None else flat @ w_ih.t()
    return out.view(T, B, w_ih.shape[0])


def _hidden_projection(h, w_hh, b_hh):
    return torch.addmm(b_hh, h, w_hh.t()) if b_hh is not None else h @ w_hh.t()


def _lstm_step(gx, gh, c, w_hr):
    i, f, g, o = (gx + gh).chunk(4, dim=1)
    i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
    c_new = f * c + i * g
    h_new = o * c_new.tanh()
    if w_hr is not None:
        h_new = h_new @ w_hr.t()
    return h_new, c_new, torch.cat((i, f, g, o, c_new), dim=1)


def _gru_step(gx, gh, h):
    ar, az, an = gx.chunk(3, dim=1)
    br, bz, bn = gh.chunk(3, dim=1)
    r = (ar + br).sigmoid()
    z = (az + bz).sigmoid()
    n = (an + r * bn).tanh()
    h_new = n + z * (h - n)
    return h_new, torch.cat((r, z, n, bn), dim=1)


def _rnn_step(mode, gx, gh):
    pre = gx + gh
    return pre.tanh() if mode == "rnn_tanh" else pre.relu()


def _valid(t, lengths):
    """(B, 1) bool: which sequences have a step t; None when all do."""
    return None if lengths is None else (lengths > t).unsqueeze(1)


def _hold(valid, new, old):
    return new if valid is None else torch.where(valid, new, old)


def forward(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, save=True):
    T, B, _ = x.shape
    H = w_hh.shape[0] // GATES[mode]
    gx = _input_projection(x, w_ih, b_ih)
    y = x.new_empty(T, B, h0.shape[1])
    ws = x.new_empty(workspace_shape(mode, T, B, H, h0.shape[1]) if save else (0,))
    h, c = h0, c0
    for t in _time_order(T, reverse):
        gh = _hidden_projection(h, w_hh, b_hh)
        valid = _valid(t, lengths)
        if mode == "lstm":
            h_new, c_new, act = _lstm_step(gx[t], gh, c, w_hr)
            c = _hold(valid, c_new, c)
            act[:, 4 * H :] = c
        elif mode == "gru":
            h_new, act = _gru_step(gx[t], gh, h)
        else:
            h_new = _rnn_step(mode, gx[t], gh)
        if save and mode in ("lstm", "gru"):
            ws[t] = act
        h = _hold(valid, h_new, h)
        y[t] = h
    c_n = c.clone() if mode == "lstm" else None
    return y, h.clone(), c_n, ws


def _previous(seq, first, reverse):
    """The state each step starts from: seq shifted one step against the direction, `first` at the start.

    seq: (T, B, K) states after each step; first: (B, K) -> (T, B, K)."""
    if reverse:
        return torch.cat((seq[1:], first.unsqueeze(0)), dim=0)
    return torch.cat((first.unsqueeze(0), seq[:-1]), dim=0)


def _lstm_gate_grads(dh, dc, act, c_prev, H, w_hr):
    """One LSTM step backward through the elementwise part. dh: (B, P) -> gate grads (B, 4H), dc_prev."""
    i, f, g, o, c = act.split(H, dim=1)
    if w_hr is not None:
        dh = dh @ w_hr
    tc = c.tanh()
    # Bounded factors (a saturated gate's derivative is exactly 0) multiply first, unbounded states (c_prev,
    # h_prev, Bh_n) last: 0 * huge stays 0, where (dc * huge) * 0 can overflow to inf * 0 = NaN.
    dc = dc + dh * (o * (1 - tc * tc))
    di = dc * (i * (1 - i) * g)
    df = dc * (f * (1 - f)) * c_prev
    dg = dc * (i * (1 - g * g))
    do = dh * (o * (1 - o) * tc)
    return torch.cat((di, df, dg, do), dim=1), dc * f


def _gru_gate_grads(dh, act, h_prev, H):
    """One GRU step backward. -> grads w.r.t. (A, Bh) pre-activations (each (B, 3H)) and the direct dh_prev."""
    r, z, n, bn = act.split(H, dim=1)
    dn = dh * ((1 - z) * (1 - n * n))  # factor order as in _lstm_gate_grads
    dz = dh * (z * (1 - z)) * (h_prev - n)
    dr = dn * (r * (1 - r)) * bn
    return torch.cat((dr, dz, dn), dim=1), torch.cat((dr, dz, dn * r), dim=1), dh * z


def _rnn_gate_grads(mode, dh, h):
    if mode == "rnn_tanh":
        return dh * (1 - h * h)
    return torch.where(h <= 0, 0, dh)  # torch's relu backward: a NaN output (fp16 overflow) passes dh on


def backward(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, y, ws, dy, dh_n, dc_n, need_dx=True):
    T, B, _ = x.shape
    H = w_hh.shape[0] // GATES[mode]
    h_prev = _previous(y, h0, reverse)
    c_prev = _previous(ws[:, :, 4 * H :], c0, reverse) if mode == "lstm" else None
    dgx = x.new_empty(T, B, w_hh.shape[0])  # grads of the input-side pre-activations
    dgh = x.new_empty(T, B, w_hh.shape[0]) if mode == "gru" else dgx  # hidden side (GRU's n row differs)
    dhy = x.new_empty(T, B, h0.shape[1]) if w_hr is not None else None  # dL/dh_t, for dW_hr
    dh = dh_n
    dc = dc_n if mode == "lstm" else None
    for t in reversed(_time_order(T, reverse)):
        valid = _valid(t, lengths)
        dh_t = dh + (dy[t] if valid is None else torch.where(valid, dy[t], 0))
        if mode == "lstm":
            gx_grad, dc_prev = _lstm_gate_grads(dh_t, dc, ws[t], c_prev[t], H, w_hr)
            gh_grad, direct = gx_grad, None
            dc = _hold(valid, dc_prev, dc)
        elif mode == "gru":
            gx_grad, gh_grad, direct = _gru_gate_grads(dh_t, ws[t], h_prev[t], H)
        else:
            gx_grad = gh_grad = _rnn_gate_grads(mode, dh_t, y[t])
            direct = None
        if valid is not None:
            gx_grad = torch.where(valid, gx_grad, 0)
            gh_grad = torch.where(valid, gh_grad, 0)
        dgx[t] = gx_grad
        if mode == "gru":
            dgh[t] = gh_grad
        if dhy is not None:
            dhy[t] = torch.where(valid, dh_t, 0) if valid is not None else dh_t
        dh_prev = gh_grad @ w_hh
        if direct is not None:
            dh_prev = dh_prev + direct
        dh = _hold(valid, dh_prev, dh_t)
    return _weight_grads(mode, x, h_prev, ws, w_ih, b_ih, b_hh, w_hr, dgx, dgh, dhy, dh, dc, H, need_dx)


def _flat(t):
    return t.reshape(-1, t.shape[-1])


_BLOCK_ROWS = 2048  # rows per float32 GEMM: one block for the book model (T*B = 1,120); csrc/cpu keeps the same


def _sum_of_outer(a, b):
    """sum over every (t, b) row of a^T b: a (T, B, M), b (T, B, N) -> (M, N), in a's dtype.

    One GEMM over all T*B rows accumulates rounding error ~ sqrt(T*B) eps (3e-6 relative in float32 at
    T*B = 40,000, 8x torch.nn's); GEMMs over blocks of rows summed in float64 keep it at one block's."""
    a, b = _flat(a), _flat(b)
    if a.shape[0] <= _BLOCK_ROWS:
        return a.t() @ b
    total = torch.zeros(a.shape[1], b.shape[1], dtype=torch.float64, device=a.device)
    for start in range(0, a.shape[0], _BLOCK_ROWS):
        total += a[start : start + _BLOCK_ROWS].t() @ b[start : start + _BLOCK_ROWS]
    return total.to(a.dtype)


def _weight_grads(mode, x, h_prev, ws, w_ih, b_ih, b_hh, w_hr, dgx, dgh, dhy, dh0, dc0, H, need_dx=True):
    """Everything that is not sequential, as GEMMs over all T*B rows (weight gradients in row blocks)."""
    dx = (_flat(dgx) @ w_ih).view_as(x) if need_dx else None
    dw_ih = _sum_of_outer(dgx, x)
    dw_hh = _sum_of_outer(dgh, h_prev)
    db_ih = _flat(dgx).sum(0) if b_ih is not None else None
    db_hh = _flat(dgh).sum(0) if b_hh is not None else None
    dw_hr = None
    if w_hr is not None:
        o, c = ws[:, :, 3 * H : 4 * H], ws[:, :, 4 * H :]
        dw_hr = _sum_of_outer(dhy, o * c.tanh())
    return dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr


# ---- stacks -----------------------------------------------------------------------------------------------
def _nth(items, index):
    return items[index] if items else None


def _listed(grads, like):
    """Per-layer gradients as a list, or an empty list where the parameter list is empty (absent)."""
    return list(grads) if like else []


def _layer_input(x, ys, masks, layer):
    """What layer ``layer`` of a stack reads: x, or the layer below's output times its dropout mask."""
    if layer == 0:
        return x
    return ys[layer - 1] * masks[layer - 1] if masks else ys[layer - 1]


def stack_forward_by_layers(layer_forward, mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, masks, lengths, save=True):
    """The stack contract run as one ``layer_forward`` call (a backend's forward) per layer."""
    ys, h_n, c_n, ws = [], [], [], []
    for layer in range(len(w_ih)):
        y, h, c, w = layer_forward(
            mode, _layer_input(x, ys, masks, layer), h0[layer], None if c0 is None else c0[layer], w_ih[layer],
            w_hh[layer], _nth(b_ih, layer), _nth(b_hh, layer), _nth(w_hr, layer), lengths, False, save,
        )
        ys.append(y), h_n.append(h), c_n.append(c), ws.append(w)
    stacked_ws = torch.stack(ws) if save else x.new_empty(0)
    return torch.stack(ys), torch.stack(h_n), None if c0 is None else torch.stack(c_n), stacked_ws


def stack_backward_by_layers(layer_backward, mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, masks, lengths, ys, ws,
                             dys, dh_n, dc_n, need_dx=True):
    """The stack's BPTT as one ``layer_backward`` call per layer, top down: layer l's output gradient is dys[l]
    plus the layer above's input gradient times the mask between them."""
    L = len(w_ih)
    per_layer = [None] * L
    for layer in reversed(range(L)):
        dy = dys[layer]
        if layer + 1 < L:
            above = per_layer[layer + 1][0]
            dy = dy + (above * masks[layer] if masks else above)
        per_layer[layer] = layer_backward(
            mode, _layer_input(x, ys, masks, layer), h0[layer], None if c0 is None else c0[layer], w_ih[layer],
            w_hh[layer], _nth(b_ih, layer), _nth(b_hh, layer), _nth(w_hr, layer), lengths, False, ys[layer],
            ws[layer], dy, dh_n[layer], None if dc_n is None else dc_n[layer], need_dx or layer > 0,
        )
    dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr = zip(*per_layer)
    return (
        dx[0] if need_dx else None, torch.stack(dh0), None if c0 is None else torch.stack(dc0), list(dw_ih),
        list(dw_hh), _listed(db_ih, b_ih), _listed(db_hh, b_hh), _listed(dw_hr, w_hr),
    )


def stack_forward(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, masks, lengths, save=True):
    return stack_forward_by_layers(forward, mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, masks, lengths, save)


def stack_backward(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, masks, lengths, ys, ws, dys, dh_n, dc_n,
                   need_dx=True):
    return stack_backward_by_layers(backward, mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, masks, lengths, ys, ws,
                                    dys, dh_n, dc_n, need_dx)
