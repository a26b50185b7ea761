"""Swap every torch.nn LSTM / GRU / RNN inside a model for its fused subclass, keeping the same weights, and back."""

from torch import nn

from . import backend as backends
from . import deploy
from .modules import FUSED_CLASSES


def convert(model, backend="auto"):
    """Turn each module of exact type nn.LSTM / nn.GRU / nn.RNN in ``model`` (itself and nested) into the
    fused class, in place, and return ``model``.

    The conversion changes the instance's class, so the Parameter objects (and any optimizer holding
    them), hooks and buffers stay as they are. Subclasses of the torch.nn classes are left alone: their
    forward may be custom. Modules that are already fused get ``backend`` set.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert() expects an nn.Module, got {type(model).__name__}")
    backends.check_name(backend)
    for module in model.modules():
        fused = FUSED_CLASSES.get(type(module))
        if fused is not None:
            module.__class__ = fused
            module.last_backend = None
        if isinstance(module, tuple(FUSED_CLASSES.values())):
            module.backend = backend
    return model


def revert(model):
    """The inverse of convert(): turn each fused LSTM / GRU / RNN in ``model`` (itself and nested) back into
    torch.nn's class, in place, and return ``model``; for shipping a model where fusedrnn is not installed.

    Like convert(), it changes the instances' class: the same Parameter objects, hooks and buffers. Subclasses
    of the fused classes are left alone.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"revert() expects an nn.Module, got {type(model).__name__}")
    for module in model.modules():
        if type(module) in FUSED_CLASSES.values():
            deploy.to_torch(module)
    return model
