"""The bad-input table: fusedrnn raises the exception type torch.nn raises, with a clear message."""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence

import fusedrnn

TORCH = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN": nn.RNN}
FUSED = {"LSTM": fusedrnn.LSTM, "GRU": fusedrnn.GRU, "RNN": fusedrnn.RNN}


def _hx(kind, layers, batch, size, dtype=torch.float32):
    h = torch.randn(layers, batch, size, dtype=dtype)
    return (h, torch.randn(layers, batch, size, dtype=dtype)) if kind == "LSTM" else h


# (name, call(kind, classes) -> result, message fragment expected from fusedrnn)
FORWARD_CASES = [
    ("4-D input", lambda k, m: m(torch.randn(2, 3, 4, 5)), "2D or 3D"),
    ("1-D input", lambda k, m: m(torch.randn(4)), "2D or 3D"),
    ("wrong feature size", lambda k, m: m(torch.randn(5, 2, 7)), "input_size"),
    ("dtype mismatch", lambda k, m: m(torch.randn(5, 2, 4, dtype=torch.float64)), "dtype"),
    ("integer input", lambda k, m: m(torch.randint(0, 3, (5, 2, 4))), "dtype"),
    ("empty sequence", lambda k, m: m(torch.randn(0, 2, 4)), "sequence length"),
    ("hx: wrong layers", lambda k, m: m(torch.randn(5, 2, 4), _hx(k, 3, 2, 6)), "size"),
    ("hx: wrong batch", lambda k, m: m(torch.randn(5, 2, 4), _hx(k, 2, 3, 6)), "size"),
    ("hx: wrong hidden", lambda k, m: m(torch.randn(5, 2, 4), _hx(k, 2, 2, 5)), "size"),
    ("hx: wrong dtype", lambda k, m: m(torch.randn(5, 2, 4), _hx(k, 2, 2, 6, torch.float64)), "dtype"),
    ("hx: 2-D with batched input", lambda k, m: m(torch.randn(5, 2, 4), _unbatch(_hx(k, 2, 1, 6))), "3-D"),
    ("hx: 3-D with unbatched input", lambda k, m: m(torch.randn(5, 4), _hx(k, 2, 1, 6)), "2-D"),
    ("packed: wrong feature size", lambda k, m: m(pack_sequence([torch.randn(3, 5), torch.randn(2, 5)])), "input_size"),
]
PACKED_HX_WRONG_BATCH = lambda k, m: m(pack_sequence([torch.randn(3, 4)]), _hx(k, 2, 2, 6))


def _unbatch(hx):
    return tuple(h[:, 0] for h in hx) if isinstance(hx, tuple) else hx[:, 0]


def _outcome(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - we compare whatever torch.nn raises
        return type(e), str(e)
    return None, ""


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("name,call,fragment", FORWARD_CASES, ids=[c[0] for c in FORWARD_CASES])
def test_forward_errors_match_torch(kind, name, call, fragment):
    fused = FUSED[kind](4, 6, num_layers=2, backend="reference")
    ref = TORCH[kind](4, 6, num_layers=2)
    ref_type, _ = _outcome(lambda: call(kind, ref))
    got_type, message = _outcome(lambda: call(kind, fused))
    assert ref_type is not None, f"torch.nn accepted {name}; the case is wrong"
    assert got_type is ref_type, f"{name}: torch.nn raises {ref_type.__name__}, fusedrnn {got_type}: {message}"
    assert fragment in message, f"{name}: unclear message {message!r}"


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_packed_hx_of_wrong_batch_is_refused(kind):
    """torch.nn's LSTM skips this check for packed input and runs on; fusedrnn refuses, like GRU and RNN."""
    fused = FUSED[kind](4, 6, num_layers=2, backend="reference")
    with pytest.raises(RuntimeError, match="Expected hidden"):
        PACKED_HX_WRONG_BATCH(kind, fused)
    if kind != "LSTM":
        with pytest.raises(RuntimeError, match="Expected hidden"):
            PACKED_HX_WRONG_BATCH(kind, TORCH[kind](4, 6, num_layers=2))


def test_hx_on_another_device_is_refused():
    fused = fusedrnn.GRU(4, 6, backend="reference")
    with pytest.raises(RuntimeError, match="same device"):
        fused(torch.randn(3, 2, 4), torch.zeros(1, 2, 6, device="meta"))


CONSTRUCTOR_CASES = [
    ("negative hidden", lambda cls: cls(4, -1)),
    ("zero input", lambda cls: cls(0, 5)),
    ("float hidden", lambda cls: cls(4, 5.0)),
    ("zero layers", lambda cls: cls(4, 5, num_layers=0)),
    ("dropout > 1", lambda cls: cls(4, 5, dropout=1.5)),
    ("dropout bool", lambda cls: cls(4, 5, dropout=True)),
    ("bias not bool", lambda cls: cls(4, 5, bias=1)),
    ("batch_first not bool", lambda cls: cls(4, 5, batch_first="yes")),
]


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("name,build", CONSTRUCTOR_CASES, ids=[c[0] for c in CONSTRUCTOR_CASES])
def test_constructor_errors_match_torch(kind, name, build):
    ref_type, _ = _outcome(lambda: build(TORCH[kind]))
    got_type, message = _outcome(lambda: build(FUSED[kind]))
    assert ref_type is not None and got_type is ref_type, (name, ref_type, got_type, message)


@pytest.mark.parametrize(
    "build",
    [
        lambda m: m.GRU(4, 5, proj_size=2),
        lambda m: m.RNN(4, 5, proj_size=2),
        lambda m: m.RNN(4, 5, nonlinearity="sigmoid"),
        lambda m: m.LSTM(4, 5, proj_size=5),
        lambda m: m.LSTM(4, 5, proj_size=-1),
    ],
)
def test_cell_specific_constructor_errors(build):
    ref_type, _ = _outcome(lambda: build(nn))
    got_type, _ = _outcome(lambda: build(fusedrnn))
    assert ref_type is ValueError and got_type is ValueError


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend must be"):
        fusedrnn.LSTM(4, 5, backend="cudnn")


def test_empty_batch_behaves_like_torch():
    fused = fusedrnn.LSTM(3, 4, num_layers=2, bidirectional=True)
    ref = nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    x = torch.randn(5, 0, 3, requires_grad=True)
    y, (h, c) = fused(x)
    y_ref, (h_ref, c_ref) = ref(x)
    assert y.shape == y_ref.shape and h.shape == h_ref.shape and c.shape == c_ref.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
