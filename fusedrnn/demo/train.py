"""Training loop and greedy generation of the d2l book's chapter 8 (train_ch8, predict_ch8), in our own code.

SGD on the mean cross-entropy, gradients clipped to global L2 norm 1, hidden state carried across
sequential minibatches (detached) or reset for each random one; perplexity = exp(mean loss).
"""
import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm


@dataclass
class EpochStats:
    perplexity: float
    tokens_per_s: float


def clip_gradients(params, max_norm):
    """Scale every gradient by max_norm / ||g|| when the global L2 norm ||g|| exceeds max_norm.

    The book's rule, written without a host-side comparison so a GPU step does not wait on the CPU:
    a scale clamped to 1 leaves the gradients bit-identical when the norm is small.
    """
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.sqrt(sum((g * g).sum() for g in grads))
    scale = (max_norm / norm).clamp(max=1.0)
    for g in grads:
        g.mul_(scale)


def detach_state(state):
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()


def train_epoch(net, batches, optimizer, device, random_iter):
    """One pass over `batches` ((B, T) pairs); returns its EpochStats."""
    loss_fn = nn.CrossEntropyLoss()
    state, tokens = None, 0
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    start = time.perf_counter()
    for x, y in batches:
        if state is None or random_iter:
            state = net.begin_state(x.shape[0], device)
        else:
            state = detach_state(state)
        targets = y.T.reshape(-1).to(device)
        logits, state = net(x.to(device), state)
        loss = loss_fn(logits, targets)
        optimizer.zero_grad()
        loss.backward()
        clip_gradients(net.parameters(), 1.0)
        optimizer.step()
        loss_sum += loss.detach() * targets.numel()
        tokens += targets.numel()
    mean_loss = loss_sum.item() / tokens  # .item() waits for the device before the clock stops
    return EpochStats(math.exp(mean_loss), tokens / (time.perf_counter() - start))


def train(net, loader, epochs, lr, device, random_iter=False, desc=None, progress=True):
    """Train `net` for `epochs` passes over `loader`; returns one EpochStats per epoch.

    A tqdm bar (stderr) shows the epoch, perplexity and tokens/s unless `progress` is false.
    """
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    history = []
    with tqdm(range(epochs), desc=desc, unit="epoch", disable=not progress, dynamic_ncols=True) as bar:
        for _ in bar:
            stats = train_epoch(net, loader, optimizer, device, random_iter)
            history.append(stats)
            bar.set_postfix_str(f"ppl {stats.perplexity:.2f}, {stats.tokens_per_s:,.0f} tokens/s")
    return history


@torch.no_grad()
def predict(net, prefix, num_preds, vocab, device):
    """`prefix` followed by `num_preds` characters, each the most likely next one (one step at a time)."""
    state = net.begin_state(1, device)
    outputs = [vocab[prefix[0]]]
    for ch in prefix[1:]:
        _, state = net(torch.tensor([[outputs[-1]]], device=device), state)
        outputs.append(vocab[ch])
    for _ in range(num_preds):
        logits, state = net(torch.tensor([[outputs[-1]]], device=device), state)
        outputs.append(int(logits.argmax(dim=1)))
    return "".join(vocab.to_tokens(outputs))


def timed_predictions(net, prefixes, num_preds, vocab, device):
    """predict() for each prefix, and the speed of that text generation in tokens (calls of the model, one
    character each, batch 1) per second."""
    start = time.perf_counter()
    texts = [predict(net, prefix, num_preds, vocab, device) for prefix in prefixes]
    calls = sum(len(prefix) - 1 + num_preds for prefix in prefixes)
    return texts, calls / (time.perf_counter() - start)
