"""torch.compile and torch.export on models holding fused RNNs.

Every compile uses fullgraph=True, so a graph break fails the test. The aot_eager backend runs the same kernels
as eager through AOTAutograd (fake impls, the registered autograd), so it must match eager to rounding;
inductor, the default, gets one test of its own (it is slow to compile on the CPU).
"""

import sys

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import fusedrnn
from fusedrnn.compile import compile_support

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


class Stack(nn.Module):
    """Every fused class in one model (one compile): projected 2-layer LSTM, bidirectional GRU, relu RNN."""

    def __init__(self, gru=fusedrnn.GRU):
        super().__init__()
        self.lstm = fusedrnn.LSTM(3, 6, num_layers=2, proj_size=4)
        self.gru = gru(4, 4, bidirectional=True)
        self.rnn = fusedrnn.RNN(8, 3, nonlinearity="relu")

    def forward(self, x):
        y, (h, c) = self.lstm(x)
        y, _ = self.gru(y, h[-1:].repeat(2, 1, 1).contiguous())
        y, _ = self.rnn(y)
        return y + c.sum(0).mean()


def _outputs_and_grads(model, x):
    """Output (the first, for RNN modules) and the gradients of a fixed random projection of it w.r.t. x and
    every parameter."""
    x = x.detach().requires_grad_()
    out = model(x)
    out = out[0] if isinstance(out, tuple) else out
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    grads = torch.autograd.grad((out * weights).sum(), [x, *model.parameters()])
    return [out.detach(), *grads]


def _assert_same(compiled, eager, x, **tolerance):
    for got, want in zip(_outputs_and_grads(compiled, x), _outputs_and_grads(eager, x), strict=True):
        torch.testing.assert_close(got, want, **tolerance)


@pytest.mark.parametrize("device", DEVICES)
def test_fullgraph_dynamic_matches_eager_without_recompiling(device):
    model = Stack().to(device)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=counter)
    with compile_support():
        # Sizes 0 and 1 are always specialized, and the first call's sizes must differ from each other and from
        # the feature size 3, else Dynamo's duck sizing shares one symbol between them
        _assert_same(compiled, model, torch.randn(5, 4, 3, device=device))
        compiles = counter.frame_count  # one frame; Dynamo may call the backend twice for it
        for T, B in ((8, 2), (4, 5)):
            _assert_same(compiled, model, torch.randn(T, B, 3, device=device))
        assert counter.frame_count == compiles, "a new batch size or sequence length recompiled"


def test_switch_is_scoped_and_plain_torch_rnn_works_beside_fused():
    model = Stack(gru=nn.GRU)
    x = torch.randn(4, 3, 3)
    with compile_support():
        _assert_same(torch.compile(model, fullgraph=True, backend="aot_eager"), model, x)
    assert torch._dynamo.config.allow_rnn is False
    # Without the switch: a graph break around each RNN module, as for torch.nn's alone
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported, match="allow_rnn"):
        torch.compile(model, fullgraph=True, backend="eager")(x)
    torch._dynamo.reset()
    _assert_same(torch.compile(model, backend="eager"), model, x)


@pytest.mark.slow
def test_inductor_matches_eager():
    model = fusedrnn.LSTM(3, 5, num_layers=2)
    with compile_support():
        _assert_same(torch.compile(model, fullgraph=True), model, torch.randn(4, 3, 3), rtol=1e-5, atol=1e-6)


def test_export_keeps_each_fused_layer_one_node():
    model = Stack().eval()
    x = torch.randn(5, 3, 3)
    dims = {"x": {0: torch.export.Dim("T", min=2), 1: torch.export.Dim("B", min=2)}}
    program = torch.export.export(model, (x,), dynamic_shapes=dims)
    targets = [node.target for node in program.graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.fusedrnn.layer_forward.default) == 2 + 2 + 1  # LSTM layers, GRU directions, RNN
    others = [str(t) for t in targets if t != torch.ops.fusedrnn.layer_forward.default]
    assert not [name for name in others if any(cell in name for cell in ("lstm", "gru", "rnn_"))]
    with torch.no_grad():
        for T, B in ((5, 3), (7, 2)):
            x = torch.randn(T, B, 3)
            torch.testing.assert_close(program.module()(x), model(x))


def test_named_backend_that_cannot_run_raises_under_compile():
    """Backend resolution runs at trace time; its error reaches the caller as a RuntimeError, message intact."""
    model = fusedrnn.GRU(3, 4, backend="cuda")  # the inputs are on the CPU
    with compile_support(), pytest.raises(RuntimeError, match="backend 'cuda' cannot run gru"):
        torch.compile(model, fullgraph=True, backend="eager")(torch.randn(4, 2, 3))


def test_backend_first_imported_during_a_trace_still_raises_its_error(monkeypatch):
    """The backend choice runs at trace time, so a backend's module can be imported for the first time there. After
    a compile with graph breaks (which leaves Dynamo's frame hook watching), that import once made a fullgraph
    compile fail on a generator frame inside it ("Attempt to trace generator") instead of raising the choice's error."""
    model, x = Stack(gru=nn.GRU), torch.randn(4, 3, 3)
    with compile_support():  # the sequence that first showed it: test_switch_is_scoped_and_plain_torch_rnn_works...
        torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    torch._dynamo.reset()
    torch.compile(model, backend="eager")(x)  # graph breaks around each RNN module
    monkeypatch.delitem(sys.modules, "fusedrnn.cuda", raising=False)
    model = fusedrnn.GRU(3, 4, backend="cuda")
    with compile_support(), pytest.raises(RuntimeError, match="backend 'cuda' cannot run gru"):
        torch.compile(model, fullgraph=True, backend="eager")(torch.randn(4, 2, 3))


def test_backend_choice_carries_torchs_constant_marker():
    """backend.choose is marked constant for Dynamo without importing it; the marker must be exactly what
    torch.compiler.assume_constant_result sets, else tracing would inline the chooser (env reads, warnings)."""
    from fusedrnn import backend

    def probe():
        return 0

    before = set(vars(probe))
    marked = torch.compiler.assume_constant_result(probe)
    markers = {name: vars(marked)[name] for name in set(vars(marked)) - before}
    assert markers, "torch.compiler.assume_constant_result no longer marks the function itself"
    assert {name: getattr(backend.choose, name, None) for name in markers} == markers


def test_import_does_not_load_dynamo():
    """import fusedrnn costs what import torch costs: torch._dynamo (and triton) load only when compiling."""
    import subprocess
    import sys

    code = "import sys, fusedrnn; print('torch._dynamo' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_stack_is_one_node_and_compiles_with_dropout():
    """A unidirectional stack on a backend that runs stacks (the reference here, CUDA on a GPU) is one
    fusedrnn::stack_forward node; its dropout masks are drawn in the graph, the same draws as eager. Kept after
    the graph-breaking compiles above: run after them, a generator expression on the stack path failed here."""
    model = fusedrnn.GRU(3, 5, num_layers=3, dropout=0.4, backend="reference")
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
    with compile_support():
        for T, B in ((5, 4), (7, 2)):
            x = torch.randn(T, B, 3)
            torch.manual_seed(3)
            got = _outputs_and_grads(compiled, x)
            torch.manual_seed(3)
            want = _outputs_and_grads(model, x)
            for g, w in zip(got, want, strict=True):
                torch.testing.assert_close(g, w)
    program = torch.export.export(model.eval(), (torch.randn(5, 4, 3),))
    targets = [node.target for node in program.graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.fusedrnn.stack_forward.default) == 1
    assert torch.ops.fusedrnn.layer_forward.default not in targets
