"""Drop-in subclasses of torch.nn.LSTM / GRU / RNN whose forward runs fused backends.

Parameters, initialisation, state_dict, constructor checks and errors are torch.nn's own (we subclass and
keep its __init__ and checks). The forward follows torch.nn step by step: input and hx validation with the
same exception types and messages, hx permutation for PackedSequence, zero initial states, dropout between
layers in train() only, bidirectional outputs concatenated on the feature axis and h_n laid out as
(num_layers * num_directions, B, P). Only the recurrence itself goes to ``fusedrnn.ops``.

Shapes inside: x: (T, B, I) time-major; lengths: (B,) int64 on x's device for PackedSequence input.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import backend as backends
from . import deploy
from .cells import cell_of, flat_layer_weights
from .ops import compute_dtype, grad_can_follow, op_adds_nothing, run_layer, run_stack


class _Fused:
    """Mixin holding the shared forward; must precede the torch.nn class in the bases."""

    def __init__(self, *args, backend="auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backends.check_name(backend)
        self.last_backend = None  # the backend that ran the last forward, for inspection

    def extra_repr(self):
        extra = super().extra_repr()
        return extra if self.backend == "auto" else f"{extra}, backend={self.backend!r}"

    def __prepare_scriptable__(self):
        """torch.jit.script compiles torch.nn's twin of the module (same Parameter objects): see deploy.py."""
        return deploy.torch_twin(self) if type(self) in FUSED_CLASSES.values() else self

    def __setstate__(self, state):
        super().__setstate__(state)
        deploy.check_state(self)  # a tampered checkpoint raises here, before anything runs

    def forward(self, input, hx=None):
        if torch.jit.is_tracing():  # torch.jit.trace and the TorchScript ONNX exporter: see deploy.py
            return deploy.traced_forward(self, input, hx)
        if isinstance(input, PackedSequence):
            return self._forward_packed(input, hx)
        if input.dim() not in (2, 3):
            raise ValueError(f"{type(self).__name__}: Expected input to be 2D or 3D, got {input.dim()}D instead")
        is_batched = input.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if not is_batched:
            input = input.unsqueeze(batch_dim)
        if hx is not None:
            hx = self._match_hx_rank(hx, is_batched)
        batch = input.size(batch_dim)
        hx = self._zero_state(input, batch) if hx is None else hx
        self.check_forward_args(input, hx, None)
        x = input.transpose(0, 1) if self.batch_first else input
        y, hidden = self._run(x, hx, None)
        if self.batch_first:
            y = y.transpose(0, 1)
        if not is_batched:
            y = y.squeeze(batch_dim)
            hidden = tuple(h.squeeze(1) for h in hidden)
        return y, self._pack_hidden(hidden)

    def _forward_packed(self, packed, hx):
        data, batch_sizes, sorted_indices, unsorted_indices = packed
        batch = int(batch_sizes[0])
        hx = self._zero_state(data, batch) if hx is None else self.permute_hidden(hx, sorted_indices)
        self.check_forward_args(data, hx, batch_sizes)
        # The packed batch is in sorted order: pad it without the un-sorting pad_packed_sequence would do.
        x, lengths = pad_packed_sequence(PackedSequence(data, batch_sizes))
        y, hidden = self._run(x, hx, lengths.to(x.device))
        y_data = pack_padded_sequence(y, lengths).data
        out = PackedSequence(y_data, batch_sizes, sorted_indices, unsorted_indices)
        return out, self.permute_hidden(self._pack_hidden(hidden), unsorted_indices)

    # -- cell-specific state handling (LSTM overrides) --------------------------------------------------
    def _match_hx_rank(self, hx, is_batched):
        expected = 3 if is_batched else 2
        if hx.dim() != expected:
            kind = "batched 3-D" if is_batched else "unbatched 2-D"
            raise RuntimeError(f"For {kind} input, hx should also be {expected}-D but got {hx.dim()}-D tensor")
        return hx if is_batched else hx.unsqueeze(1)

    def _zero_state(self, input, batch):
        return torch.zeros(self._num_states(), batch, self._state_size(), dtype=input.dtype, device=input.device)

    def _num_states(self):
        return self.num_layers * (2 if self.bidirectional else 1)

    def _state_size(self):
        return self.proj_size if self.proj_size > 0 else self.hidden_size

    def _split_hidden(self, hx):
        return hx, None

    def _pack_hidden(self, hidden):
        return hidden[0]

    # -- the stack ----------------------------------------------------------------------------------------
    def _flat_weights_now(self):
        """The parameters in torch.nn's flat order (``_flat_weights_names``; cells.flat_layer_weights splits them).
        Read by name on every call so that functional_call, parametrizations and weight swaps are seen. A parameter
        set to None after construction raises torch.nn's TypeError: a missing bias is not a zero bias (bias=False
        leaves the biases out of the names)."""
        flat = [_attribute(self, name) for name in self._flat_weights_names]
        for index, weight in enumerate(flat):
            if weight is None:
                name = self._flat_weights_names[index]
                raise TypeError(
                    f"expected Tensor as element {index} in argument 2, but got NoneType "
                    f"({type(self).__name__}.{name} is None)"
                )
        return flat

    def _check_states(self, x, states):
        """What torch.nn checks inside its kernels, with clearer messages (same exception type)."""
        if x.size(0) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        for state in states:
            if state.device != x.device:
                raise RuntimeError(
                    f"Input and hidden tensors are not at the same device, found input tensor at {x.device} "
                    f"and hidden tensor at {state.device}"
                )
            if state.dtype != x.dtype:
                raise RuntimeError(f"hx dtype ({state.dtype}) does not match input dtype ({x.dtype})")

    def _runs_in_one_call(self, name, x, tensors):
        """Whether the backend's inference contract (reference.py) can run this whole forward: the backend has it,
        no dropout applies, no gradient can follow and nothing records the call (ops.op_adds_nothing). Then one
        backend call replaces a Python loop and an op call per layer (most of a decode step's fixed cost).
        tensors: every tensor of the call."""
        if not backends.runs_inference(name) or (self.dropout > 0 and self.training and self.num_layers > 1):
            return False
        return not grad_can_follow(tensors) and op_adds_nothing(x, tensors)

    def _run(self, x, hx, lengths):
        """x: (T, B, I); hx as given to forward (batched, permuted) -> y: (T, B, D*P), (h_n,) or (h_n, c_n)."""
        cell = cell_of(self)
        h0, c0 = self._split_hidden(hx)
        self._check_states(x, [h0] if c0 is None else [h0, c0])
        if deploy.exporting_to_onnx():  # torch.onnx.export(dynamo=True): standard ONNX nodes, see deploy.py
            return deploy.onnx_run(self, x, hx, lengths)
        if x.size(1) == 0:  # an empty batch has nothing to compute; the reference handles it without kernels
            name = "reference"
        else:
            name = backends.choose(self.backend, x.device.type, compute_dtype(x), cell)
        if name == "cuda" and not torch.compiler.is_compiling():  # auto between the GPU backends: by shape
            layers = 1 if self.bidirectional else self.num_layers
            name = backends.planned_on_gpu(
                self.backend, cell, x, compute_dtype(x), self.hidden_size, self.proj_size, layers
            )
        self.__dict__["last_backend"] = name  # a plain attribute: nn.Module.__setattr__'s checks cost ~3 us a call
        flat = self._flat_weights_now()
        if self._runs_in_one_call(name, x, [x, h0, c0, *flat, lengths]):
            y, h_n, c_n = backends.get(name).inference(
                cell, x.contiguous(), h0, c0, flat, self.bias, self.num_layers, self.bidirectional, lengths
            )
            return y, (h_n,) if c0 is None else (h_n, c_n)
        weights = flat_layer_weights(flat, self.bias, self._num_states())
        if not self.bidirectional and self.num_layers > 1 and backends.runs_stacks(name) and _same_parameters(weights):
            return self._run_stack(x, h0, c0, weights, lengths, cell, name)
        directions = 2 if self.bidirectional else 1
        layer_input = x.contiguous()
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(directions):
                index = layer * directions + direction
                y, h, c = run_layer(
                    layer_input, h0[index], None if c0 is None else c0[index], weights[index], lengths, cell,
                    direction == 1, name,
                )
                outputs.append(y)
                h_n.append(h)
                c_n.append(c)
            layer_input = outputs[0] if directions == 1 else torch.cat(outputs, dim=2)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
        hidden = (_stacked(h_n), _stacked(c_n)) if c0 is not None else (_stacked(h_n),)
        return layer_input, hidden

    def _run_stack(self, x, h0, c0, weights, lengths, cell, name):
        """_run for a unidirectional stack in one call, where the backend runs one (CUDA's wavefront). The
        dropout masks are drawn up front, one F.dropout per layer boundary in layer order: the same random
        draws as dropping each layer's output in turn."""
        masks = []
        if self.dropout > 0 and self.training:
            ones = x.new_ones(x.size(0), x.size(1), self._state_size())
            masks = [F.dropout(ones, self.dropout, training=True) for _ in range(self.num_layers - 1)]
        y, h_n, c_n = run_stack(x.contiguous(), h0, c0, weights, masks, lengths, cell, name)
        return y, (h_n, c_n) if c0 is not None else (h_n,)


def _attribute(module, name):
    """getattr(module, name) for a parameter name, without nn.Module.__getattr__'s Python call (~0.8 us) where the
    parameter is registered: that is where getattr finds it (functional_call swaps it there too). A parametrized
    name is not registered (a class property serves it) and takes getattr."""
    found = module._parameters.get(name)
    return found if found is not None and name not in module.__dict__ else getattr(module, name)


def _stacked(states):
    """(N, B, S) from N states (B, S): a tensor of its own like torch.nn's h_n, never a view (user code calls
    ``h.detach_()``, which a view refuses). One state that a backend returned directly, with nothing recording it
    (the decode path: no autograd history, no tracing, mode or subclass), is unsqueezed in place instead: the contract
    makes it a fresh tensor nobody else holds, and a copy would cost ~3 us of a 70 us call."""
    state = states[0]
    if len(states) == 1 and not state.requires_grad and op_adds_nothing(state, (state,)):
        return state.unsqueeze_(0)
    return torch.stack(states)


def _same_parameters(weights):
    """Whether every layer has the same parameters present (torch.nn: always); the stack call needs that.

    No generator expression here: run after the graph-breaking compiles of test_compile.py, a fullgraph trace
    refused one ("Attempt to trace generator")."""
    present = [[w is not None for w in layer] for layer in weights]
    return present.count(present[0]) == len(present)


class LSTM(_Fused, nn.LSTM):
    """torch.nn.LSTM with a fused forward. Extra keyword: ``backend`` ("auto", "reference", "cpp", ...)."""

    def _match_hx_rank(self, hx, is_batched):
        expected = 3 if is_batched else 2
        if hx[0].dim() != expected or hx[1].dim() != expected:
            kind = "batched 3-D" if is_batched else "unbatched 2-D"
            raise RuntimeError(
                f"For {kind} input, hx and cx should also be {expected}-D but got "
                f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
            )
        return hx if is_batched else (hx[0].unsqueeze(1), hx[1].unsqueeze(1))

    def _zero_state(self, input, batch):
        h = super()._zero_state(input, batch)
        c = torch.zeros(self._num_states(), batch, self.hidden_size, dtype=input.dtype, device=input.device)
        return h, c

    def _split_hidden(self, hx):
        return hx

    def _pack_hidden(self, hidden):
        return hidden


class GRU(_Fused, nn.GRU):
    """torch.nn.GRU with a fused forward. Extra keyword: ``backend``."""


class RNN(_Fused, nn.RNN):
    """torch.nn.RNN (tanh or relu) with a fused forward. Extra keyword: ``backend``."""


FUSED_CLASSES = {nn.LSTM: LSTM, nn.GRU: GRU, nn.RNN: RNN}
deploy.register_safe_globals(FUSED_CLASSES.values())
