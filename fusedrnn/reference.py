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

Backend contract (``fusedrnn/ops.py`` is the only caller; every backend module exposes these):

  forward(cell, x, h0, c0, weights, lengths, reverse, save=True) -> (y, h_n, c_n, saved)
  backward(cell, x, h0, c0, weights, lengths, reverse, y, saved, dy, dh_n, dc_n, need_dx=True)
      -> (dx, dh0, dc0, dweights); dx is None without need_dx (x needs no gradient)
  unavailable_reason(device, dtype, cell) -> why the backend cannot run there, or None

  cell: a name from fusedrnn/cells.py ("lstm" | "gru" | "rnn_tanh" | "rnn_relu");  G = its gates;  P = proj_size or H
  x: (T, B, I) contiguous, time-major     h0: (B, P)     c0: (B, H) for lstm, else None
  weights: cells.LayerWeights (w_ih: (G*H, I), w_hh: (G*H, P), b_ih, b_hh: (G*H,) or None, w_hr: (P, H) or None)
  lengths: (B,) int64 on x's device, or None (every sequence has T steps)
  reverse: run t = T-1 .. 0
  y: (T, B, P)   h_n: (B, P)   c_n: (B, H) or None
  saved: the activations forward keeps for backward, (T, B, saved_rows * H) in x's dtype, the same layout in every
      backend (cells.saved_shape; this module's docstring end says what the rows hold). save=False says no
      backward follows (inference): saved is then an empty (0,) tensor and need not be computed.
  dy: (T, B, P)  dh_n: (B, P)  dc_n: (B, H) or None; every gradient has its tensor's shape, None where the
  tensor is None; dweights: a LayerWeights of the weights' gradients.
Outputs are fresh tensors: none aliases an input or another output (torch.library's rule).

A backend that can run several layers at once (the CUDA backend's wavefront) also exposes the stack contract,
L unidirectional layers with dropout between them in one call; ops.py uses it for such stacks where the
backend has it, one forward call per layer otherwise:

  stack_forward(cell, x, h0, c0, weights, masks, lengths, save=True) -> (ys, h_n, c_n, saved)
  stack_backward(cell, x, h0, c0, weights, masks, lengths, ys, saved, dys, dh_n, dc_n, need_dx=True)
      -> (dx, dh0, dc0, dweights)

  x: (T, B, I)   h0: (L, B, P)   c0: (L, B, H) or None
  weights: list of L LayerWeights (layer l > 0 has input size P), every layer with the same parameters present
  masks: list of L - 1 (T, B, P) tensors, or empty: layer l + 1 reads layer l's output times masks[l]
      (dropout's mask, 1/(1-p) scale included)
  ys: (L, T, B, P) every layer's output (ys[L-1] is the stack's)   h_n: (L, B, P)   c_n: (L, B, H) or None
  saved: (L, *cells.saved_shape) or (0,) without save   dys, dh_n, dc_n: like ys, h_n, c_n
  dweights: list of L LayerWeights; dx is None without need_dx

A backend may also run a module's whole forward in one call where nothing will differentiate it (inference,
decoding); modules.py uses it where the backend has it (backend.INFERENCE_BACKENDS), no dropout applies, no
gradient can follow and nothing records the call (ops.op_adds_nothing):

  inference(cell, x, hx, cx, weights, has_biases, num_layers, bidirectional, lengths) -> (y, h_n, c_n)

  x: (T, B, I)   hx: (L*D, B, P)   cx: (L*D, B, H) or None   (L = num_layers, D = 2 if bidirectional else 1)
  weights: torch.nn's flat parameter list (cells.flat_layer_weights), layer-direction k = layer * D + direction
  y: (T, B, D*P) the last layer's output, directions concatenated   h_n: (L*D, B, P)   c_n: (L*D, B, H) or None
It equals ``inference_by_layers``: forward(..., save=False) layer by layer, direction 1 reversed.

saved, by cell: lstm = activated i, f, g, o and c_t (held); gru = r, z, n and Bh_n; rnn = nothing (tanh' and
relu' follow from y). Backward is hand-written BPTT: one GEMM per step for dh_{t-1}, then the epilogue
(fusedrnn/epilogue.py): the weight and input gradients as GEMMs over the whole sequence.
"""

import torch

from .cells import flat_layer_weights, saved_shape
from .epilogue import input_projection, layer_input, previous, weight_grads


def unavailable_reason(device, dtype, cell):
    """Why this backend cannot run for (device, dtype, cell), or None. The reference runs everywhere."""
    return


def _time_order(T, reverse):
    return range(T - 1, -1, -1) if reverse else range(T)


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


def _rnn_step(cell, gx, gh):
    pre = gx + gh
    return pre.tanh() if cell == "rnn_tanh" else pre.relu()


def _valid(t, lengths):
    """(B, 1) bool: which sequences have a step t; None when all do."""
    return None if lengths is None else (lengths > t).unsqueeze(1)


def _hold(valid, new, old):
    return new if valid is None else torch.where(valid, new, old)


def forward(cell, x, h0, c0, weights, lengths, reverse, save=True):
    T, B, _ = x.shape
    H = weights.hidden_size(cell)
    gx = input_projection(x, weights.w_ih, weights.b_ih)
    y = x.new_empty(T, B, h0.shape[1])
    saved = x.new_empty(saved_shape(cell, T, B, H) if save else (0,))
    h, c = h0, c0
    for t in _time_order(T, reverse):
        gh = _hidden_projection(h, weights.w_hh, weights.b_hh)
        valid = _valid(t, lengths)
        if cell == "lstm":
            h_new, c_new, act = _lstm_step(gx[t], gh, c, weights.w_hr)
            c = _hold(valid, c_new, c)
            act[:, 4 * H :] = c
        elif cell == "gru":
            h_new, act = _gru_step(gx[t], gh, h)
        else:
            h_new = _rnn_step(cell, gx[t], gh)
        if save and cell in ("lstm", "gru"):
            saved[t] = act
        h = _hold(valid, h_new, h)
        y[t] = h
    c_n = c.clone() if cell == "lstm" else None
    return y, h.clone(), c_n, saved


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


def _rnn_gate_grads(cell, dh, h):
    if cell == "rnn_tanh":
        return dh * (1 - h * h)
    return torch.where(h <= 0, 0, dh)  # torch's relu backward: a NaN output (fp16 overflow) passes dh on


def backward(cell, x, h0, c0, weights, lengths, reverse, y, saved, dy, dh_n, dc_n, need_dx=True):
    T, B, _ = x.shape
    H, w_hh, w_hr = weights.hidden_size(cell), weights.w_hh, weights.w_hr
    h_prev = previous(y, h0, reverse)
    c_prev = previous(saved[:, :, 4 * H :], c0, reverse) if cell == "lstm" else None
    dgx = x.new_empty(T, B, w_hh.shape[0])  # grads of the input-side pre-activations
    dgh = x.new_empty(T, B, w_hh.shape[0]) if cell == "gru" else dgx  # hidden side (GRU's n row differs)
    dhy = x.new_empty(T, B, h0.shape[1]) if w_hr is not None else None  # dL/dh_t, for dW_hr
    dh = dh_n
    dc = dc_n if cell == "lstm" else None
    for t in reversed(_time_order(T, reverse)):
        valid = _valid(t, lengths)
        dh_t = dh + (dy[t] if valid is None else torch.where(valid, dy[t], 0))
        if cell == "lstm":
            gx_grad, dc_prev = _lstm_gate_grads(dh_t, dc, saved[t], c_prev[t], H, w_hr)
            gh_grad, direct = gx_grad, None
            dc = _hold(valid, dc_prev, dc)
        elif cell == "gru":
            gx_grad, gh_grad, direct = _gru_gate_grads(dh_t, saved[t], h_prev[t], H)
        else:
            gx_grad = gh_grad = _rnn_gate_grads(cell, dh_t, y[t])
            direct = None
        if valid is not None:
            gx_grad = torch.where(valid, gx_grad, 0)
            gh_grad = torch.where(valid, gh_grad, 0)
        dgx[t] = gx_grad
        if cell == "gru":
            dgh[t] = gh_grad
        if dhy is not None:
            dhy[t] = torch.where(valid, dh_t, 0) if valid is not None else dh_t
        dh_prev = gh_grad @ w_hh
        if direct is not None:
            dh_prev = dh_prev + direct
        dh = _hold(valid, dh_prev, dh_t)
    dx, dweights = weight_grads(cell, x, h_prev, saved, weights, dgx, dgh, dhy, need_dx)
    return dx, dh, dc, dweights


# ---- stacks -----------------------------------------------------------------------------------------------
def stack_forward_by_layers(layer_forward, cell, x, h0, c0, weights, masks, lengths, save=True):
    """The stack contract run as one ``layer_forward`` call (a backend's forward) per layer."""
    ys, h_n, c_n, saved = [], [], [], []
    for layer, layer_weights in enumerate(weights):
        y, h, c, s = layer_forward(
            cell, layer_input(x, ys, masks, layer), h0[layer], None if c0 is None else c0[layer], layer_weights,
            lengths, False, save,
        )
        ys.append(y), h_n.append(h), c_n.append(c), saved.append(s)
    stacked_saved = _stacked(saved) if save else x.new_empty(0)
    return _stacked(ys), _stacked(h_n), None if c0 is None else _stacked(c_n), stacked_saved


def _stacked(tensors):
    """torch.stack, never a view: below autograd (inside a custom op) torch.stack is cat + view, and a view leaks
    out of the op to the user (``h_n.detach_()`` then raises where torch.nn's does not)."""
    return torch.cat([t.unsqueeze(0) for t in tensors])


def stack_backward_by_layers(layer_backward, cell, x, h0, c0, weights, masks, lengths, ys, saved, dys, dh_n, dc_n,
                             need_dx=True):
    """The stack's BPTT as one ``layer_backward`` call per layer, top down: layer l's output gradient is dys[l]
    plus the layer above's input gradient times the mask between them."""
    L = len(weights)
    per_layer = [None] * L
    for layer in reversed(range(L)):
        dy = dys[layer]
        if layer + 1 < L:
            above = per_layer[layer + 1][0]
            dy = dy + (above * masks[layer] if masks else above)
        per_layer[layer] = layer_backward(
            cell, layer_input(x, ys, masks, layer), h0[layer], None if c0 is None else c0[layer], weights[layer],
            lengths, False, ys[layer], saved[layer], dy, dh_n[layer], None if dc_n is None else dc_n[layer],
            need_dx or layer > 0,
        )
    dx, dh0, dc0, dweights = zip(*per_layer)
    return dx[0] if need_dx else None, torch.stack(dh0), None if c0 is None else torch.stack(dc0), list(dweights)


def inference_by_layers(layer_forward, cell, x, hx, cx, weights, has_biases, num_layers, bidirectional, lengths):
    """The inference contract run as one ``layer_forward`` call (a backend's forward, save=False) per
    layer-direction."""
    directions = 2 if bidirectional else 1
    layers = flat_layer_weights(weights, has_biases, num_layers * directions)
    h_n, c_n = [], []
    for layer in range(num_layers):
        ys = []
        for k in range(layer * directions, (layer + 1) * directions):
            y, h, c, _ = layer_forward(
                cell, x, hx[k], None if cx is None else cx[k], layers[k], lengths, k % directions == 1, False
            )
            ys.append(y), h_n.append(h), c_n.append(c)
        x = ys[0] if directions == 1 else torch.cat(ys, dim=2)
    return x, _stacked(h_n), None if cx is None else _stacked(c_n)


def inference(cell, x, hx, cx, weights, has_biases, num_layers, bidirectional, lengths):
    return inference_by_layers(forward, cell, x, hx, cx, weights, has_biases, num_layers, bidirectional, lengths)


def stack_forward(cell, x, h0, c0, weights, masks, lengths, save=True):
    return stack_forward_by_layers(forward, cell, x, h0, c0, weights, masks, lengths, save)


def stack_backward(cell, x, h0, c0, weights, masks, lengths, ys, saved, dys, dh_n, dc_n, need_dx=True):
    return stack_backward_by_layers(backward, cell, x, h0, c0, weights, masks, lengths, ys, saved, dys, dh_n, dc_n,
                                    need_dx)
