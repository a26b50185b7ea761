"""After training: TorchScript, tracing, ONNX export and whole-model checkpoints of the fused modules.

Which path each runs, and why:
- ``torch.jit.script`` and ``torch.jit.trace`` (and the TorchScript-based ``torch.onnx.export``, which traces)
  run torch.nn's own forward and kernels (``aten::lstm`` / ``gru`` / ``rnn_tanh`` / ``rnn_relu``): a scripted
  or traced model is then loadable and runnable without Python and without fusedrnn (``torch.jit.load`` in
  C++), which our ops, implemented in Python around the backends, could not offer. Scripting goes through
  ``__prepare_scriptable__`` (torch.nn's twin of the module, same Parameter objects); tracing through a
  check in forward.
- ``torch.onnx.export(..., dynamo=True)`` captures the model with torch.export; torch.nn's path would not help
  there (in torch 2.13 its export of nn.LSTM / GRU / RNN fails in onnxruntime once T or B differ from the
  example input, checked by hand). Under that exporter each layer becomes one standard ONNX LSTM / GRU / RNN
  node (both directions in one node), written with the public ``torch.onnx.ops.symbolic_multi_out``; a plain
  ``torch.export`` still keeps one ``fusedrnn::layer_forward`` node per layer-direction.
- Checkpoints: the fused classes hold only parameters and plain attributes, and are registered with
  ``torch.serialization.add_safe_globals`` at import, so ``torch.load(weights_only=True)`` accepts them with
  the allowlist a script passes for torch.nn's classes. Unpickling validates ``backend`` like the constructor.
"""

import copy

import torch
import torch.nn.functional as F

from . import backend as backends
from .cells import CELLS, cell_of, flat_layer_weights

_FUSED_ATTRIBUTES = ("backend", "last_backend")
# torch.nn's gate order (reference.py) -> ONNX's: LSTM (i, f, g, o) -> (i, o, f, c); GRU (r, z, n) -> (z, r, h).
_ONNX_GATE_ORDER = {"lstm": (0, 3, 1, 2), "gru": (1, 0, 2), "rnn_tanh": (0,), "rnn_relu": (0,)}
_ONNX_OPERATOR = {"lstm": ("LSTM", {}), "gru": ("GRU", {"linear_before_reset": 1}),
                  "rnn_tanh": ("RNN", {"activations": ["Tanh"]}), "rnn_relu": ("RNN", {"activations": ["Relu"]})}


def torch_class(module):
    """The torch.nn class (LSTM, GRU or RNN) that ``module`` is an instance of."""
    return CELLS[cell_of(module)].nn_class


def to_torch(module):
    """Turn a fused module into its torch.nn class in place (the inverse of convert's class swap)."""
    module.__class__ = torch_class(module)
    for name in _FUSED_ATTRIBUTES:
        module.__dict__.pop(name, None)
    return module


def torch_twin(module):
    """A new torch.nn module holding the same Parameter objects as ``module``, which is left unchanged."""
    twin = copy.copy(module)  # a new __dict__ whose containers are still shared: copy those
    for name in ("_parameters", "_buffers", "_modules", "_flat_weights"):
        twin.__dict__[name] = copy.copy(module.__dict__[name])
    return to_torch(twin)


def traced_forward(module, input, hx):
    """torch.nn's forward, for torch.jit.trace and the TorchScript-based ONNX exporter: it traces to
    torch.nn's graph (which passes trace's check and exports to ONNX RNN nodes by torch's own symbolics)."""
    return torch_class(module).forward(module, input, hx)


def exporting_to_onnx():
    """True while torch.onnx.export(dynamo=True) captures the model (torch.export under the exporter's flag).
    is_compiling() first: a cheap test (about 0.1 us) that keeps the flag lookup (about 1.7 us) off the eager
    path; it is True in both of the exporter's capture modes, non-strict and strict (Dynamo)."""
    return torch.compiler.is_compiling() and _in_onnx_export()


@backends._constant_under_compile
def _in_onnx_export():
    """torch.onnx.is_in_onnx_export(), evaluated when Dynamo traces the call. Dynamo's own rule folds that
    function to False, and the exporter falls back to a strict (Dynamo) capture when its non-strict one fails:
    that capture would then record fused ops it cannot translate, and its error would hide the first one (a
    projected LSTM's). Strict capture of the ONNX path fails anyway (Dynamo skips torch.onnx.ops), so
    exports of fused modules go through the non-strict capture, the exporter's first choice."""
    return torch.onnx.is_in_onnx_export()


def check_state(module):
    """After unpickling (torch.load, pickle, deepcopy): the fused attributes are what the constructor allows.
    Pickles written before an attribute existed get its constructor default."""
    module.__dict__.setdefault("backend", "auto")
    module.__dict__.setdefault("last_backend", None)
    backends.check_name(module.backend)


def register_safe_globals(classes):
    """Let torch.load(weights_only=True) rebuild the fused classes (parameters and plain attributes only)."""
    torch.serialization.add_safe_globals(list(classes))


# -- ONNX ---------------------------------------------------------------------------------------------------
def onnx_run(module, x, hx, lengths):
    """``_Fused._run`` as standard ONNX nodes, one per layer (both directions in one node).

    x: (T, B, I); hx: (L*D, B, P) or its (h0, c0) pair for LSTM; lengths: (B,) int64 or None
    -> y: (T, B, D*H), (h_n,) or (h_n, c_n) each (L*D, B, H)."""
    cell = cell_of(module)
    if module.proj_size > 0:
        raise torch.onnx.OnnxExporterError(
            f"fusedrnn: cannot export LSTM with proj_size={module.proj_size} to ONNX: ONNX's LSTM operator has "
            "no projection (torch.nn.LSTM with proj_size cannot be exported either)"
        )
    h0, c0 = hx if CELLS[cell].has_c else (hx, None)
    directions = 2 if module.bidirectional else 1
    seq_lens = None if lengths is None else lengths.to(torch.int32)
    layer_input, h_n, c_n = x, [], []
    for layer in range(module.num_layers):
        states = slice(layer * directions, (layer + 1) * directions)
        y, h, c = _onnx_layer(module, cell, layer, layer_input, seq_lens, h0[states],
                              None if c0 is None else c0[states])
        layer_input = y
        h_n.append(h)
        c_n.append(c)
        if module.dropout > 0 and module.training and layer < module.num_layers - 1:
            layer_input = F.dropout(layer_input, module.dropout, training=True)
    hidden = (torch.cat(h_n), torch.cat(c_n)) if c0 is not None else (torch.cat(h_n),)
    return layer_input, hidden


def _onnx_layer(module, cell, layer, x, seq_lens, h0, c0):
    """One layer as one ONNX node. x: (T, B, I); seq_lens: (B,) int32 or None; h0, c0: (D, B, H)
    -> y: (T, B, D*H), h_n and c_n (None for GRU / RNN): (D, B, H)."""
    directions = 2 if module.bidirectional else 1
    per_direction = [_onnx_weights(module, cell, layer * directions + d) for d in range(directions)]
    w, r, b = (None if parts[0] is None else torch.stack(parts) for parts in zip(*per_direction))
    op_type, attributes = _ONNX_OPERATOR[cell]
    attributes = dict(attributes, hidden_size=module.hidden_size,
                      direction="bidirectional" if directions == 2 else "forward")
    if "activations" in attributes:  # ONNX lists them per direction
        attributes["activations"] = attributes["activations"] * directions
    T, B, H = x.shape[0], x.shape[1], module.hidden_size
    states = [h0] if c0 is None else [h0, c0]  # outputs: Y, then one final state per initial state
    outputs = torch.onnx.ops.symbolic_multi_out(
        op_type, [x, w, r, b, seq_lens, *states], attributes, dtypes=[x.dtype] * (1 + len(states)),
        shapes=[(T, directions, B, H)] + [(directions, B, H)] * len(states),
    )
    y = outputs[0].permute(0, 2, 1, 3).reshape(T, B, directions * H)  # (T, D, B, H) -> (T, B, D*H)
    return y, outputs[1], outputs[2] if c0 is not None else None


def _onnx_weights(module, cell, index):
    """ONNX's W (G*H, I), R (G*H, H) and B (2*G*H,) or None of layer-direction ``index``, gates reordered."""
    weights = flat_layer_weights(module._flat_weights_now(), module.bias, module._num_states())[index]
    order = _ONNX_GATE_ORDER[cell]

    def reorder(t):  # slices, not chunk(): the exporter folds single-output ops on constants into initializers
        rows = t.shape[0] // len(order)
        return torch.cat([t[g * rows:(g + 1) * rows] for g in order])

    bias = None if weights.b_ih is None else torch.cat([reorder(weights.b_ih), reorder(weights.b_hh)])
    return reorder(weights.w_ih), reorder(weights.w_hh), bias
