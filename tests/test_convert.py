"""Drop-in guarantees: isinstance, parameters and state_dict interchange, convert(), copies and pickling."""

import copy
import io

import pytest
import torch
from conftest import check_oracle, random_input
from torch import nn

import fusedrnn


def test_isinstance_and_parameter_layout():
    for fused_cls, torch_cls, kwargs in [
        (fusedrnn.LSTM, nn.LSTM, {"proj_size": 3}),
        (fusedrnn.GRU, nn.GRU, {}),
        (fusedrnn.RNN, nn.RNN, {"nonlinearity": "relu"}),
    ]:
        fused = fused_cls(5, 7, num_layers=2, bidirectional=True, **kwargs)
        ref = torch_cls(5, 7, num_layers=2, bidirectional=True, **kwargs)
        assert isinstance(fused, torch_cls)
        assert [(n, p.shape) for n, p in fused.named_parameters()] == [
            (n, p.shape) for n, p in ref.named_parameters()
        ]
        assert list(fused.state_dict()) == list(ref.state_dict())


def test_same_init_as_torch():
    torch.manual_seed(3)
    fused = fusedrnn.GRU(5, 7, num_layers=2)
    torch.manual_seed(3)
    ref = nn.GRU(5, 7, num_layers=2)
    for a, b in zip(fused.parameters(), ref.parameters()):
        assert torch.equal(a, b)


def test_positional_nonlinearity_like_torch():
    fused = fusedrnn.RNN(4, 5, 2, "relu")
    assert fused.nonlinearity == "relu" and fused.num_layers == 2


def test_checkpoints_load_both_ways():
    fused = fusedrnn.LSTM(4, 6, num_layers=2, dtype=torch.float64)
    ref = nn.LSTM(4, 6, num_layers=2, dtype=torch.float64)
    ref.load_state_dict(fused.state_dict())
    back = fusedrnn.LSTM(4, 6, num_layers=2, dtype=torch.float64)
    back.load_state_dict(ref.state_dict())
    x = random_input(3, 2, 4)
    torch.testing.assert_close(back(x)[0], ref(x)[0], rtol=1e-12, atol=1e-12)


class _Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 4), nn.LSTM(4, 6, num_layers=2))
        self.blocks = nn.ModuleList([nn.GRU(6, 5), nn.RNN(5, 3, nonlinearity="relu", batch_first=True)])

    def forward(self, x):
        y, _ = self.encoder[1](self.encoder[0](x))
        y, _ = self.blocks[0](y)
        y, _ = self.blocks[1](y.transpose(0, 1))
        return y


def test_convert_nested_model_keeps_weights_and_outputs():
    model = _Nested().double()
    x = random_input(5, 3, 4)
    expected = model(x)
    params_before = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert fusedrnn.convert(model, backend="reference") is model
    assert type(model.encoder[1]) is fusedrnn.LSTM
    assert type(model.blocks[0]) is fusedrnn.GRU and type(model.blocks[1]) is fusedrnn.RNN
    assert all(a is b for a, b in zip(model.parameters(), params_before))  # the optimizer still holds them
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)
    model(x).sum().backward()
    optimizer.step()
    assert model.encoder[1].last_backend == "reference"


@pytest.mark.parametrize("change,base", [(fusedrnn.convert, nn.LSTM), (fusedrnn.revert, fusedrnn.GRU)],
                         ids=["convert", "revert"])
def test_leaves_subclasses_and_rejects_non_modules(change, base):
    """convert swaps only torch.nn's own classes for fused ones, revert only the fused ones back."""

    class Custom(base):
        pass

    model = nn.Sequential(Custom(3, 4))
    change(model)
    assert type(model[0]) is Custom
    with pytest.raises(TypeError):
        change("not a model")


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_deepcopy_pickle_and_flatten(cell):
    from conftest import make_pair

    fused, ref = make_pair(cell, 4, 5, "reference", num_layers=2)
    fused.flatten_parameters()
    clone = copy.deepcopy(fused)
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.backend == "reference" and type(loaded) is type(fused)
    for model in (clone, loaded):
        check_oracle(model, ref, random_input(3, 2, 4), None, dtype=torch.float64)


def test_repr_names_backend():
    assert "backend='reference'" in repr(fusedrnn.GRU(3, 4, backend="reference"))
    assert "backend" not in repr(fusedrnn.GRU(3, 4))
