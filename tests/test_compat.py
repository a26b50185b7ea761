"""Training-stack compatibility: what users do to torch.nn RNNs works the same on the fused ones.

functional_call, parameter swaps, .to(), frozen weights, weight tying, gradient clipping, weight-norm and
spectral-norm parametrizations, double backward, state_dict round trips. Each test applies the same operation
to a fused model and a torch.nn model with the same weights, in float64, and compares outputs and gradients.
"""

import io

import pytest
import torch
from conftest import CELLS, _flatten_out, cell_kwargs, make_pair, on_backends, random_hx, random_input
from torch import nn
from torch.nn.utils import parametrizations, parametrize

EXACT = {"rtol": 1e-12, "atol": 1e-12}


def _pair(cell, **kwargs):
    return make_pair(cell, 4, 5, num_layers=2, dtype=torch.float64, **kwargs)


def _loss(out):
    """A fixed random projection of every output, so that each gets a distinct gradient."""
    outs = _flatten_out(out)
    g = torch.Generator().manual_seed(1)
    return sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype).to(o)).sum() for o in outs)


def _step(model, x, hx=None):
    """Forward + backward; returns the outputs and every parameter's .grad (None where it has none)."""
    model.zero_grad(set_to_none=True)
    out = model(x, hx)
    _loss(out).backward()
    return [o.detach() for o in _flatten_out(out)], [p.grad for p in model.parameters()]


def _assert_same(fused, ref, x, hx=None):
    got, want = _step(fused, x, hx), _step(ref, x, hx)
    for a, b in zip(got[0] + got[1], want[0] + want[1], strict=True):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, **EXACT)


@pytest.mark.parametrize("cell", CELLS)
def test_functional_call(cell):
    fused, ref = _pair(cell)
    x = random_input(5, 3, 4)
    own = fused(x)[0].detach()
    params = {name: (p.detach() + 0.1 * torch.randn_like(p)).requires_grad_() for name, p in fused.named_parameters()}
    outs = [torch.func.functional_call(m, params, (x,)) for m in (fused, ref)]
    grads = [torch.autograd.grad(_loss(out), list(params.values())) for out in outs]
    for a, b in zip((*_flatten_out(outs[0]), *grads[0]), (*_flatten_out(outs[1]), *grads[1]), strict=True):
        torch.testing.assert_close(a, b, **EXACT)
    torch.testing.assert_close(fused(x)[0], own, **EXACT)  # the module's own parameters are untouched


@pytest.mark.parametrize("swap", ["setattr", "load_state_dict_assign"])
def test_parameter_swapping(swap):
    fused, ref = _pair("lstm", proj_size=3)
    new = {name: torch.randn_like(p) for name, p in fused.named_parameters()}
    for model in (fused, ref):
        if swap == "setattr":
            for name, value in new.items():
                setattr(model, name, nn.Parameter(value.clone()))
        else:
            model.load_state_dict({k: v.clone() for k, v in new.items()}, assign=True)
    _assert_same(fused, ref, random_input(5, 3, 4))


@pytest.mark.parametrize("swap", [False, True], ids=["assign", "swap_params"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_to_dtype_and_device(device, swap):
    """.to() as usual, and with torch.__future__'s swap_module_params_on_conversion (Parameters keep identity).

    (torch.utils.swap_tensors on an RNN's Parameter fails alike for both: torch.nn's RNNs hold weakrefs.)"""
    fused, ref = make_pair("gru", 4, 5, num_layers=2, backend="reference")
    before = list(fused.parameters())
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(swap)
    try:
        fused, ref = fused.to(device, torch.float64), ref.to(device, torch.float64)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)
    assert type(fused).__name__ == "GRU" and fused.backend == "reference"
    assert all(p.dtype == torch.float64 and p.device.type == device for p in fused.parameters())
    assert not swap or all(a is b for a, b in zip(before, fused.parameters()))
    _assert_same(fused, ref, random_input(5, 3, 4).to(device))


@pytest.mark.parametrize("cell", CELLS)
def test_requires_grad_false_on_some_weights(cell):
    fused, ref = _pair(cell, bidirectional=True)
    for model in (fused, ref):
        model.weight_hh_l0.requires_grad_(False)
        model.bias_ih_l1_reverse.requires_grad_(False)
    _assert_same(fused, ref, random_input(5, 3, 4))
    assert fused.weight_hh_l0.grad is None and fused.bias_ih_l1_reverse.grad is None


def test_weight_tying():
    """Layer 1 uses one Parameter for its input and recurrent weights; a second module shares layer 0's."""
    pairs = [_pair("lstm"), make_pair("lstm", 4, 5, dtype=torch.float64)]
    models = []
    for enc, dec in zip(*pairs):
        enc.weight_ih_l1 = enc.weight_hh_l1
        dec.weight_ih_l0, dec.weight_hh_l0 = enc.weight_ih_l0, enc.weight_hh_l0
        models.append(nn.ModuleList([enc, dec]))
    assert len(list(models[0].parameters())) == len(list(models[1].parameters()))

    def run(pair, x):
        enc, dec = pair
        _, state = enc(x)
        return dec(x, tuple(s[-1:] for s in state))

    x = random_input(5, 3, 4)
    got, want = [], []
    for model, sink in zip(models, (got, want)):
        out = run(model, x)
        _loss(out).backward()
        sink += [*_flatten_out(out), *(p.grad for p in model.parameters())]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **EXACT)


def test_clip_grad_norm():
    fused, ref = _pair("gru", bidirectional=True)
    x = random_input(5, 3, 4)
    norms = []
    for model in (fused, ref):
        _loss(model(x)).backward()
        norms.append(nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05))
    torch.testing.assert_close(norms[0], norms[1], **EXACT)
    assert norms[0] > 0.05  # it did clip
    for a, b in zip(fused.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, **EXACT)


def _parametrize(model, norm):
    norm(model, "weight_hh_l0")
    norm(model, "weight_ih_l1")


@pytest.mark.parametrize("cell", CELLS)
def test_weight_norm(cell):
    fused, ref = _pair(cell)
    for model in (fused, ref):
        _parametrize(model, parametrizations.weight_norm)
    ref.load_state_dict(fused.state_dict())
    assert isinstance(fused, nn.RNNBase) and "parametrizations.weight_hh_l0.original0" in fused.state_dict()
    _assert_same(fused, ref, random_input(5, 3, 4))


@pytest.mark.parametrize("mode", ["eval", "train_cached"])
def test_spectral_norm(mode):
    """torch.nn's RNN evaluates a parametrization 4 times per forward (4 power iterations in train mode), the
    fused ones once, like nn.Linear: outputs agree in eval() and, in train(), under parametrize.cached()."""
    fused, ref = _pair("lstm")
    for model in (fused, ref):
        _parametrize(model, parametrizations.spectral_norm)
    ref.load_state_dict(fused.state_dict())
    x = random_input(5, 3, 4)
    if mode == "eval":
        fused.eval(), ref.eval()
        _assert_same(fused, ref, x)
        return
    for _ in range(2):  # the second step starts from the power iteration's updated vectors
        with parametrize.cached():
            _assert_same(fused, ref, x)
    for name, buffer in fused.named_buffers():
        torch.testing.assert_close(buffer, ref.get_buffer(name), **EXACT)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("cell,proj_size", [(cell, 0) for cell in CELLS] + [("lstm", 2)])
def test_double_backward_like_torch(cell, proj_size, device):
    """A gradient penalty: d/dparams of ||d loss / d (x, h0)||^2 + loss, against torch.nn on the CPU (cuDNN
    has no double backward: torch.nn raises there, the fused modules run it on CUDA too)."""
    fused, ref = _pair(cell, bidirectional=True, **cell_kwargs(cell, proj_size))
    x = random_input(4, 3, 4)
    hx = random_hx(cell, 4, 3, 5, proj_size=proj_size)
    results = []
    for model in (fused.to(device), ref):
        on = next(model.parameters()).device
        leaves = [t.detach().to(on).requires_grad_() for t in (x, *_as_tuple(hx))]
        state = tuple(leaves[1:]) if cell == "lstm" else leaves[1]
        loss = _loss(model(leaves[0], state))
        grads = torch.autograd.grad(loss, leaves, create_graph=True)
        penalty = sum(g.pow(2).sum() for g in grads) + loss
        results.append(torch.autograd.grad(penalty, [*leaves, *model.parameters()]))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a.cpu(), b, **EXACT)


@pytest.mark.parametrize("cell", CELLS)
def test_double_backward_when_the_input_needs_no_gradient(cell):
    """Data fed to the first layer needs no gradient, so its BPTT computes no dx; a penalty on the parameter
    gradients still matches torch.nn's."""
    fused, ref = _pair(cell, **cell_kwargs(cell, 0))
    x = random_input(4, 3, 4)
    results = []
    for model in (fused, ref):
        loss = _loss(model(x))
        grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
        penalty = sum(g.pow(2).sum() for g in grads) + loss
        results.append(torch.autograd.grad(penalty, list(model.parameters())))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, **EXACT)


def _as_tuple(hx):
    return hx if isinstance(hx, tuple) else (hx,)


@pytest.mark.parametrize("cell", CELLS)
def test_gradgradcheck(cell):
    fused = make_pair(cell, 2, 3, dtype=torch.float64)[0]
    names = [name for name, _ in fused.named_parameters()]
    x = random_input(3, 2, 2).requires_grad_()

    def f(x, *weights):
        return _flatten_out(torch.func.functional_call(fused, dict(zip(names, weights)), (x,)))

    assert torch.autograd.gradgradcheck(f, (x, *fused.parameters()), fast_mode=True)


def test_gradgradcheck_packed():
    fused = make_pair("gru", 2, 3, bidirectional=True, dtype=torch.float64)[0]
    lengths = torch.tensor([3, 1, 2])
    x = random_input(3, 3, 2).requires_grad_()

    def f(x):
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
        out, h = fused(packed)
        return out.data, h

    assert torch.autograd.gradgradcheck(f, (x,), fast_mode=True)


def test_third_order_like_torch():
    fused, ref = _pair("rnn_tanh")
    x = random_input(3, 2, 4)
    results = []
    for model in (fused, ref):
        leaf = x.clone().requires_grad_()
        (g1,) = torch.autograd.grad(model(leaf)[0].pow(3).sum(), leaf, create_graph=True)
        (g2,) = torch.autograd.grad(g1.pow(2).sum(), leaf, create_graph=True)
        results.append(torch.autograd.grad(g2.sum(), [leaf, *model.parameters()]))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, **EXACT)


@pytest.mark.parametrize("cell,proj_size", [(cell, 0) for cell in CELLS] + [("lstm", 2)])
def test_state_dict_round_trip(cell, proj_size):
    """fused -> torch.nn -> fused through torch.save / torch.load (weights_only), strict loading both ways."""
    fused, ref = _pair(cell, bidirectional=True, **cell_kwargs(cell, proj_size))
    ref.load_state_dict(_saved_and_loaded(fused.state_dict()))  # make_pair copied ref -> fused; go back
    again, _ = _pair(cell, bidirectional=True, **cell_kwargs(cell, proj_size))
    again.load_state_dict(_saved_and_loaded(ref.state_dict()))
    assert list(again.state_dict()) == list(ref.state_dict())
    _assert_same(again, ref, random_input(5, 3, 4))


def _saved_and_loaded(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@on_backends("cpu", exclude=("triton",))  # triton's outputs pass the same module code: test_modules' matrix
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_outputs_detach_in_place_like_torch(backend, cell, layers, grad):
    """Truncated BPTT (the book's train_epoch_ch8: ``state.detach_()``) needs outputs that are not views: torch.nn
    returns fresh tensors, and so must the fused modules, on every backend, layer count and grad mode."""
    fused, ref = make_pair(cell, 4, 5, backend=backend, num_layers=layers, dtype=torch.float64)
    x = random_input(3, 2, 4)
    with torch.set_grad_enabled(grad):
        outs = [_flatten_out(model(x)) for model in (fused, ref)]
    for got, want in zip(*outs, strict=True):
        assert got._is_view() == want._is_view()
        got.detach_()
        torch.testing.assert_close(got, want.detach_(), **EXACT)
