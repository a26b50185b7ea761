"""Deployment like torch.nn: TorchScript, tracing, ONNX export (both exporters, run by onnxruntime),
whole-model checkpoints under a torch.nn allowlist, and revert(). fusedrnn/deploy.py says which path each runs.

Scripted and traced models run torch.nn's kernels, so they are compared with torch.nn for equality; ONNX
runtime results go through the project's oracle (error vs float64 within 2x torch.nn's float32 error)."""

import copy
import io
import pickle
import subprocess
import sys
import textwrap

import onnx  # test dependencies (the README's test command installs them, with onnxscript for dynamo=True)
import onnxruntime
import pytest
import torch
from conftest import CELLS, FACTOR, FLOOR, TORCH_CLASSES, make_pair, random_hx, random_input, random_packed, rel_err
from torch import nn

import fusedrnn


class Tagger(nn.Module):
    """A typical model around an RNN; module level so that whole-model pickles can name it. Its forward
    calls the RNN without and with an initial state (the state from the first call)."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(rnn.hidden_size * (2 if rnn.bidirectional else 1), 3)

    def forward(self, x):
        _, hidden = self.rnn(x)
        y, hidden = self.rnn(x, hidden)
        return self.head(y), hidden


def tagger_pair(cell, **kwargs):
    """(converted Tagger, the same Tagger with torch.nn's class), same weights, float32, eval mode."""
    _, ref = make_pair(cell, 4, 5, **kwargs)
    plain = Tagger(ref).eval()
    fused = fusedrnn.convert(copy.deepcopy(plain))
    return fused, plain


def assert_same(got, expected):
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


# -- TorchScript ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cell", CELLS)
def test_script_a_model_holding_a_converted_rnn(cell):
    fused, plain = tagger_pair(cell, num_layers=2, bidirectional=True)
    rnn = fused.rnn
    scripted = torch.jit.script(fused)
    x = random_input(6, 3, 4, dtype=torch.float32)
    assert_same(scripted(x), plain(x))
    assert_same(scripted(x[:, :1]), plain(x[:, :1]))  # another batch size, same script
    # torch.jit.script puts what __prepare_scriptable__ returns (torch.nn's twin) in the parent, as for any
    # module with that hook; the Parameter objects are the same and convert() fuses the model again.
    assert type(fused.rnn) is TORCH_CLASSES[cell]
    assert all(a is b for a, b in zip(fused.rnn.parameters(), rnn.parameters()))
    assert type(fusedrnn.convert(fused).rnn) is type(rnn)


@pytest.mark.parametrize("cell", CELLS)
def test_script_a_fused_module_has_torch_nn_methods(cell):
    """Scripting a bare module gives torch.nn's scripted RNN: forward__0 takes a tensor (hx optional),
    forward__1 a PackedSequence; called on the same inputs, the same outputs."""
    fused, ref = make_pair(cell, 4, 5, num_layers=2, batch_first=True)
    scripted = torch.jit.script(fused)
    assert type(fused) is not TORCH_CLASSES[cell]  # scripting it alone leaves the module as it was
    assert scripted._c._method_names() == torch.jit.script(ref)._c._method_names()
    x = random_input(6, 3, 4, batch_first=True, dtype=torch.float32)
    hx = random_hx(cell, 2, 3, 5, dtype=torch.float32)
    assert_same(scripted.forward__0(x, None), ref(x))
    assert_same(scripted.forward__0(x, hx), ref(x, hx))
    packed = random_packed([4, 6, 2], 4, dtype=torch.float32)
    got, expected = scripted.forward__1(packed, hx), ref(packed, hx)
    assert_same(got[0].data, expected[0].data)
    assert_same(got[1], expected[1])


# -- tracing ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cell", CELLS)
def test_trace_passes_its_check_and_records_torch_nn_ops(cell):
    fused, plain = tagger_pair(cell, num_layers=2)
    x = random_input(6, 3, 4, dtype=torch.float32)
    traced = torch.jit.trace(fused, x)  # check_trace=True: the trace is re-run and compared
    assert f"aten::{cell}(" in str(traced.inlined_graph) and "fusedrnn::" not in str(traced.inlined_graph)
    other = random_input(8, 2, 4, dtype=torch.float32)
    assert_same(traced(other), plain(other))
    assert type(fused.rnn) is not TORCH_CLASSES[cell]  # tracing leaves the model fused


# -- ONNX -----------------------------------------------------------------------------------------------------
ONNX_CONFIGS = {  # name -> (constructor kwargs, whether an initial state is an input)
    "1-layer": ({}, False),
    "2-layer-bidirectional-batch_first-nobias": (
        {"num_layers": 2, "bidirectional": True, "batch_first": True, "bias": False}, True),
    "3-layer": ({"num_layers": 3}, True),
}
ONNX_OPERATOR = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN", "rnn_relu": "RNN"}


class WithState(nn.Module):
    """An RNN whose forward takes the initial state as an input (ONNX needs a module to export)."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x, hx):
        return self.rnn(x, hx)


def export_onnx(model, args, path, dynamo, batch_first):
    """Export ``model(*args)``, args = (x,) or (x, hx), with dynamic batch and sequence axes; returns the
    loaded ONNX model."""
    time_axis, batch_axis = (1, 0) if batch_first else (0, 1)
    hx = args[1] if len(args) > 1 else None
    if dynamo:
        T, B = torch.export.Dim("T"), torch.export.Dim("B")
        shapes = [{time_axis: T, batch_axis: B}]
        if hx is not None:
            shapes.append(({1: B}, {1: B}) if isinstance(hx, tuple) else {1: B})
        torch.onnx.export(model, args, path, dynamo=True, dynamic_shapes=tuple(shapes), verbose=False)
    else:
        names = ["x"] + [f"state{i}" for i in range(len(flat_tensors(args)) - 1)]
        axes = {"x": {time_axis: "T", batch_axis: "B"}, **{n: {1: "B"} for n in names[1:]}}
        torch.onnx.export(model, args, path, dynamo=False, input_names=names, dynamic_axes=axes)
    return onnx.load(path)


def flat_tensors(values):
    """Tensors and (h, c) pairs -> a flat list of tensors (the ONNX model's inputs or outputs, in order)."""
    return [t for v in values for t in (v if isinstance(v, tuple) else (v,))]


def to_float(value):
    return tuple(t.float() for t in value) if isinstance(value, tuple) else value.float()


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("config", sorted(ONNX_CONFIGS))
@pytest.mark.parametrize("cell", CELLS)
def test_onnx_export_runs_in_onnxruntime_like_torch_nn(cell, config, dynamo, tmp_path):
    kwargs, with_state = ONNX_CONFIGS[config]
    fused, ref = make_pair(cell, 4, 5, **kwargs)
    fused.eval()
    layers, directions = fused.num_layers, 2 if fused.bidirectional else 1
    batch_first = fused.batch_first

    def inputs(T, B):  # float64
        x = random_input(T, B, 4, batch_first=batch_first)
        return [x, random_hx(cell, layers * directions, B, 5)] if with_state else [x]

    model = WithState(fused) if with_state else fused
    example = tuple(to_float(v) for v in inputs(5, 3))
    graph = export_onnx(model, example, str(tmp_path / "m.onnx"), dynamo, batch_first).graph
    operators = [node.op_type for node in graph.node]
    assert operators.count(ONNX_OPERATOR[cell]) == layers, operators  # both directions in one node
    assert all(node.domain in ("", "ai.onnx") for node in graph.node), "non-standard operators"
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"))
    gold = copy.deepcopy(ref).double()
    for T, B in [(7, 2), (1, 1)]:  # neither is the example's shape
        args = inputs(T, B)
        feeds = {i.name: t.float().numpy() for i, t in zip(session.get_inputs(), flat_tensors(args))}
        got = session.run(None, feeds)
        truth = flat_tensors(gold(*args))
        base = flat_tensors(ref(*map(to_float, args)))
        assert len(got) == len(truth)
        for name, g, b, t in zip(["y", "h_n", "c_n"], got, base, truth):
            err_onnx, err_torch = rel_err(torch.from_numpy(g), t), rel_err(b, t)
            assert err_onnx <= FACTOR["output"] * err_torch + FLOOR[torch.float32], (name, err_onnx, err_torch)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_onnx_export_of_a_projected_lstm_is_a_clear_error(dynamo, tmp_path):
    """ONNX's LSTM has no projection; torch.nn.LSTM(proj_size=...) cannot be exported either."""
    fused = fusedrnn.LSTM(4, 5, proj_size=3).eval()
    with pytest.raises(torch.onnx.OnnxExporterError, match="projection"):
        torch.onnx.export(fused, (torch.randn(5, 3, 4),), str(tmp_path / "m.onnx"), dynamo=dynamo)


def test_dynamo_onnx_export_in_train_mode_keeps_dropout_between_layers(tmp_path):
    """As the eager forward: dropout between layers (not after the last) in train mode only."""
    fused = fusedrnn.GRU(4, 5, num_layers=3, dropout=0.5).train()
    path = str(tmp_path / "m.onnx")
    torch.onnx.export(fused, (torch.randn(5, 3, 4),), path, dynamo=True)
    assert [n.op_type for n in onnx.load(path).graph.node].count("Dropout") == 2


def test_plain_torch_export_still_keeps_fused_nodes():
    """The ONNX path is taken only under torch.onnx.export: torch.export keeps the fused op."""
    fused = fusedrnn.GRU(4, 5, num_layers=2, bidirectional=True).eval()
    program = torch.export.export(fused, (torch.randn(5, 3, 4),))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count("fusedrnn.layer_forward.default") == 4
    assert not any("onnx" in t for t in targets)


# -- whole-model checkpoints ----------------------------------------------------------------------------------
def save(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def torch_nn_allowlist(cell):
    """What a training script passes to load a whole Tagger built with torch.nn's classes."""
    return [Tagger, TORCH_CLASSES[cell], nn.Linear]


@pytest.mark.parametrize("cell", CELLS)
def test_whole_model_loads_under_the_torch_nn_allowlist(cell):
    fused, plain = tagger_pair(cell, num_layers=2)
    fused.rnn.backend = "reference"
    x = random_input(6, 3, 4, dtype=torch.float32)
    expected = fused(x)
    with torch.serialization.safe_globals(torch_nn_allowlist(cell)):
        torch.load(save(plain), weights_only=True)  # the torch.nn model loads under this allowlist
        loaded = torch.load(save(fused), weights_only=True)  # and so does the fused one
    assert type(loaded.rnn) is type(fused.rnn) and loaded.rnn.backend == "reference"
    assert loaded.rnn.last_backend == "reference"
    assert_same(loaded(x), expected)


def test_tampered_backend_raises_the_constructor_error_at_load():
    fused, _ = tagger_pair("lstm")
    fused.rnn.backend = "os.system"
    with (torch.serialization.safe_globals(torch_nn_allowlist("lstm")),
          pytest.raises(ValueError, match="backend must be 'auto' or one of")):
        torch.load(save(fused), weights_only=True)
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        pickle.loads(pickle.dumps(fused))
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        copy.deepcopy(fused)


def test_old_pickles_without_fused_attributes_load_with_defaults():
    fused = fusedrnn.GRU(4, 5)
    for name in ("backend", "last_backend"):
        del fused.__dict__[name]  # what a pickle written before the attribute existed holds
    with torch.serialization.safe_globals([nn.GRU]):
        loaded = torch.load(save(fused), weights_only=True)
    assert loaded.backend == "auto" and loaded.last_backend is None
    loaded(torch.randn(3, 2, 4))


@pytest.mark.parametrize("cell", CELLS)
def test_pickle_and_deepcopy_round_trips(cell):
    fused, _ = make_pair(cell, 4, 5, backend="reference", num_layers=2, bidirectional=True)
    x = random_input(5, 2, 4, dtype=torch.float32)
    expected = fused(x)
    for clone in (pickle.loads(pickle.dumps(fused)), copy.deepcopy(fused)):
        assert type(clone) is type(fused) and clone.backend == "reference" and clone.last_backend == "reference"
        assert_same(clone(x), expected)


@pytest.mark.slow
def test_without_fusedrnn_imported(tmp_path):
    """In a fresh interpreter that never imports fusedrnn: a fused checkpoint fails under the torch.nn
    allowlist with a message naming fusedrnn; a scripted model, a traced one and a reverted checkpoint load
    and run."""
    fused, plain = tagger_pair("lstm")  # the bare RNN is saved: Tagger's module imports fusedrnn
    x = random_input(6, 3, 4, dtype=torch.float32)
    torch.save(fused.rnn, tmp_path / "fused.pt")
    torch.save(fusedrnn.revert(copy.deepcopy(fused.rnn)), tmp_path / "reverted.pt")
    torch.jit.save(torch.jit.script(copy.deepcopy(fused)), tmp_path / "scripted.pt")
    torch.jit.save(torch.jit.trace(fused, x), tmp_path / "traced.pt")
    torch.save({"x": x, "y": plain(x), "rnn_y": plain.rnn(x)}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import pickle, sys
        import torch
        from torch import nn
        io = torch.load({str(tmp_path / "io.pt")!r})
        with torch.serialization.safe_globals([nn.LSTM]):
            try:
                torch.load({str(tmp_path / "fused.pt")!r}, weights_only=True)
                raise SystemExit("loaded without fusedrnn")
            except pickle.UnpicklingError as e:
                assert "fusedrnn" in str(e), e
            reverted = torch.load({str(tmp_path / "reverted.pt")!r}, weights_only=True)
        torch.testing.assert_close(reverted(io["x"]), io["rnn_y"], rtol=0, atol=0)
        for name in ("scripted", "traced"):
            model = torch.jit.load(f"{tmp_path}/{{name}}.pt")
            torch.testing.assert_close(model(io["x"]), io["y"], rtol=0, atol=0)
        assert "fusedrnn" not in sys.modules
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# -- revert ---------------------------------------------------------------------------------------------------
def test_revert_is_the_inverse_of_convert():
    model = nn.Sequential(nn.LSTM(4, 5, 2), nn.GRU(5, 5), nn.RNN(5, 5, nonlinearity="relu"))
    params = list(model.parameters())
    state = copy.deepcopy(model.state_dict())
    fusedrnn.convert(model, backend="reference")
    assert fusedrnn.revert(model) is model
    assert [type(m) for m in model] == [nn.LSTM, nn.GRU, nn.RNN]
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert all(not hasattr(m, "backend") and not hasattr(m, "last_backend") for m in model)
    assert repr(model) == repr(nn.Sequential(nn.LSTM(4, 5, 2), nn.GRU(5, 5), nn.RNN(5, 5, nonlinearity="relu")))
    for key, value in model.state_dict().items():
        assert_same(value, state[key])


@pytest.mark.parametrize("cell", CELLS)
def test_revert_round_trip_gives_equal_outputs(cell):
    fused, plain = tagger_pair(cell, num_layers=2, bidirectional=True)
    x = random_input(6, 3, 4, dtype=torch.float32)
    fused_out = fused(x)
    fusedrnn.revert(fused)
    assert type(fused.rnn) is TORCH_CLASSES[cell]
    assert_same(fused(x), plain(x))
    fusedrnn.convert(fused)
    torch.testing.assert_close(fused(x), fused_out)
