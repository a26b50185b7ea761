"""torch.compile on models holding fused RNNs: the one switch it needs.

Dynamo refuses to trace any instance of nn.RNN / nn.GRU / nn.LSTM unless ``torch._dynamo.config.allow_rnn``
is set (an isinstance check), and the fused modules must be such instances to be drop-ins. Under
``compile_support()`` a fused layer traces as one ``fusedrnn::layer_forward`` node per layer-direction, with
symbolic batch size and sequence length; plain torch.nn RNNs in the same model are traced too (torch's own
experimental support: their graph is specialized on the sequence length). Outside it, compiling such a model
graph-breaks around every RNN module, as torch does for torch.nn's (and ``fullgraph=True`` raises).

Dynamo compiles at the first call and at every recompilation, not at ``torch.compile()``: keep the switch on
around the calls. ``torch.export`` sets the flag itself.
"""

import torch


def compile_support():
    """Context manager and decorator that lets torch.compile trace RNN modules, fused and plain; it restores
    the previous setting on exit.

    Usage::

        model = torch.compile(model, fullgraph=True, dynamic=True)
        with fusedrnn.compile_support():
            loss = loss_fn(model(x), target)  # first call compiles
    """
    return torch._dynamo.config.patch(allow_rnn=True)
