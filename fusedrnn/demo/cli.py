"""`python -m fusedrnn.demo`: the d2l book's deep-LSTM language model on The Time Machine, via fusedrnn.

The defaults are the book's run (section "Deep Recurrent Neural Networks"): LSTM(28, 256, 2 layers)
on one-hot characters, batch 32 x 35 steps, sequential minibatches, SGD lr 2, clipping 1, 500 epochs.
`--compare` trains torch.nn's model from the same initial weights on the same minibatches. Bad
options end with one line on stderr and a non-zero exit status.
"""
import argparse
import copy
import math
import pathlib
import pickle
import statistics
import sys

import torch

from .. import backend
from . import data
from .model import DEMO_CELLS, CharLM, class_name, make_rnn
from .plot import plot_perplexity, supported_formats
from .train import timed_predictions, train

PROG = "python -m fusedrnn.demo"
PREFIXES = ("time traveller", "traveller")
NUM_PREDS = 50
AGREEMENT_EPOCHS = 10  # --compare reports how closely the curves agree over these first epochs


class DemoError(Exception):
    """A problem with the user's options or files, reported as one line without a traceback."""


class Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line instead of usage + message, as for every other bad option."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive(kind):
    """argparse type: a finite `kind` value > 0."""
    def parse(text):
        value = kind(text)
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value" messages
    return parse


def build_parser():
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    p.add_argument("--cell", choices=DEMO_CELLS, default="lstm", help="recurrent cell (default: lstm)")
    p.add_argument("--layers", type=positive(int), default=2, help="stacked layers (default: 2)")
    p.add_argument("--hidden", type=positive(int), default=256, help="hidden units per layer (default: 256)")
    p.add_argument("--epochs", type=positive(int), default=500, help="passes over the corpus (default: 500)")
    p.add_argument("--lr", type=positive(float), default=2.0, help="SGD learning rate (default: 2)")
    p.add_argument("--batch-size", type=positive(int), default=32, help="sequences per minibatch (default: 32)")
    p.add_argument("--num-steps", type=positive(int), default=35, help="time steps per minibatch (default: 35)")
    p.add_argument("--random-iter", action="store_true",
                   help="random minibatches, state reset for each (default: sequential, state carried over)")
    p.add_argument("--backend", choices=("auto", *backend.NAMES), default="auto",
                   help="fusedrnn backend (default: auto, which honours FUSEDRNN_BACKEND)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and minibatch order (default: 0)")
    p.add_argument("--compare", action="store_true",
                   help="also train torch.nn's model from the same weights and minibatches, print both")
    p.add_argument("--plot", metavar="FILE.png", help="write the perplexity per epoch to this image")
    p.add_argument("--save", metavar="FILE", help="save the trained weights (a state_dict torch.nn also loads)")
    p.add_argument("--load", metavar="FILE", help="start from the weights of a --save checkpoint")
    p.add_argument("--data", metavar="FILE", help="the Time Machine text (default: the copy in the package)")
    return p


def first_line(err):
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def resolve_device(name):
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, ValueError) as err:
        raise DemoError(f"device {name!r} is not usable here: {first_line(err)}") from None
    return device


def check_batches_fit(num_tokens, batch_size, num_steps):
    """Every epoch must hold at least one minibatch, whatever its random start offset."""
    if batch_size * num_steps > num_tokens - num_steps - 1:
        raise DemoError(f"--batch-size {batch_size} x --num-steps {num_steps} does not fit in the "
                        f"{num_tokens:,}-token corpus")


def check_output(path, option, formats=None):
    """Fail before training, not after, when an output file cannot be written."""
    if path is None:
        return
    parent = pathlib.Path(path).resolve().parent
    if not parent.is_dir():
        raise DemoError(f"{option} {path}: directory {parent} does not exist")
    suffix = pathlib.Path(path).suffix.lstrip(".").lower()
    if formats is not None and suffix not in formats:
        raise DemoError(f"{option} {path}: unknown image format {suffix!r} (try png, svg or pdf)")


def describe(args):
    return f"{args.cell.upper()}, {args.layers} layer(s) x {args.hidden} hidden units"


def build_model(args, vocab_size, fused):
    """CharLM around fusedrnn's cell (backend args.backend) when `fused`, else around torch.nn's."""
    return CharLM(make_rnn(args.cell, vocab_size, args.hidden, args.layers, fused, args.backend), vocab_size)


def state_dict_mismatch(expected, found):
    """Why the `found` state_dict cannot load into a model whose state_dict is `expected`; None if it can."""
    if not isinstance(found, dict) or not all(isinstance(v, torch.Tensor) for v in found.values()):
        return "it is not a state_dict of tensors"
    if expected.keys() - found.keys():
        return f"it lacks {min(expected.keys() - found.keys())}"
    if found.keys() - expected.keys():
        return f"it has an unexpected {min(found.keys() - expected.keys())}"
    for name, tensor in expected.items():
        if found[name].shape != tensor.shape:
            return f"{name} has shape {tuple(found[name].shape)}, expected {tuple(tensor.shape)}"
    return None


def load_checkpoint(net, path, what):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        raise DemoError(f"cannot load checkpoint {path}: {first_line(err)}") from None
    problem = state_dict_mismatch(net.state_dict(), state)
    if problem:
        raise DemoError(f"checkpoint {path} does not fit the model ({what}): {problem}")
    net.load_state_dict(state)


def save_checkpoint(net, path):
    try:
        torch.save({name: t.detach().cpu() for name, t in net.state_dict().items()}, path)
    except OSError as err:
        raise DemoError(f"cannot save checkpoint {path}: {first_line(err)}") from None


def probe_backend(net, args, device):
    """Run one minibatch-shaped forward so that a backend unusable here fails now; returns the one that ran."""
    x = torch.zeros(args.batch_size, args.num_steps, dtype=torch.long, device=device)
    try:
        with torch.no_grad():
            net(x, net.begin_state(args.batch_size, device))
    except (RuntimeError, ValueError, NotImplementedError) as err:
        raise DemoError(f"backend {args.backend!r} cannot run on {device}: {first_line(err)}") from None
    return net.rnn.last_backend


def median_speed(history):
    return statistics.median(s.tokens_per_s for s in history)


def print_comparison(fused_label, fused, torch_label, baseline, generation):
    """Side-by-side final perplexity, median tokens/s, speed ratio, text generation speed (fused, torch.nn) and
    early-epoch curve agreement."""
    first = min(AGREEMENT_EPOCHS, len(fused))
    gap = max(abs(f.perplexity - b.perplexity) / b.perplexity for f, b in zip(fused[:first], baseline[:first]))
    width = max(len(fused_label), len(torch_label), 12)
    print(f"{'':26}{fused_label:>{width}}  {torch_label:>{width}}")
    print(f"{'final perplexity':26}{fused[-1].perplexity:>{width}.3f}  {baseline[-1].perplexity:>{width}.3f}")
    print(f"{'tokens/s (median epoch)':26}{median_speed(fused):>{width},.0f}  {median_speed(baseline):>{width},.0f}")
    print(f"{'speed ratio':26}{median_speed(fused) / median_speed(baseline):>{width}.2f}x")
    print(f"{'generation tokens/s':26}{generation[0]:>{width},.0f}  {generation[1]:>{width},.0f}")
    print(f"{'generation speed ratio':26}{generation[0] / generation[1]:>{width}.2f}x")
    print(f"curves agree over the first {first} epochs to a relative perplexity difference of {gap:.1e}")


def prepare_model(args, vocab_size, device):
    """The fused model (seeded, or from --load) on `device`, its initial state_dict, and the backend that runs it."""
    torch.manual_seed(args.seed)
    try:
        net = build_model(args, vocab_size, fused=True)
    except (RuntimeError, ValueError) as err:
        raise DemoError(f"cannot build fusedrnn.{class_name(args.cell)}: {first_line(err)}") from None
    if args.load:
        load_checkpoint(net, args.load, describe(args))
    initial_state = copy.deepcopy(net.state_dict())
    net.to(device)
    return net, initial_state, probe_backend(net, args, device)


def print_setup(args, vocab_size, num_tokens, backend, device):
    order = "random" if args.random_iter else "sequential"
    print(f"Time Machine: {vocab_size}-token vocabulary, {num_tokens:,} tokens, {order} minibatches of "
          f"{args.batch_size} x {args.num_steps}")
    print(f"fusedrnn.{class_name(args.cell)}({vocab_size}, {args.hidden}, num_layers={args.layers}) + "
          f"Linear({args.hidden}, {vocab_size}), backend {backend}, on {device}; SGD lr {args.lr:g}, "
          f"gradient norm clipped to 1, {args.epochs} epochs", flush=True)


def run(args):
    device = resolve_device(args.device)
    corpus, vocab = data.load_corpus(args.data)
    check_batches_fit(len(corpus), args.batch_size, args.num_steps)
    check_output(args.plot, "--plot", supported_formats())
    check_output(args.save, "--save")
    net, initial_state, backend = prepare_model(args, len(vocab), device)
    print_setup(args, len(vocab), len(corpus), backend, device)

    def fit(model, label):
        loader = data.BatchLoader(corpus, args.batch_size, args.num_steps, args.random_iter, seed=args.seed)
        return label, train(model, loader, args.epochs, args.lr, device, args.random_iter, desc=label)

    runs = [fit(net, f"fusedrnn.{class_name(args.cell)} [{backend}]")]
    texts, generation = timed_predictions(net, PREFIXES, NUM_PREDS, vocab, device)
    if args.compare:
        baseline = build_model(args, len(vocab), fused=False)
        baseline.load_state_dict(initial_state)
        runs.append(fit(baseline.to(device), f"torch.nn.{class_name(args.cell)}"))
        _, baseline_generation = timed_predictions(baseline, PREFIXES, NUM_PREDS, vocab, device)
        print_comparison(*runs[0], *runs[1], (generation, baseline_generation))
    if args.save:
        save_checkpoint(net, args.save)
        print(f"saved the weights to {args.save}")
    if args.plot:
        plot_perplexity(args.plot, [(f"{label} on {device}", history) for label, history in runs],
                        f"Time Machine character model: {describe(args)}")
        print(f"wrote {args.plot}")
    final = runs[0][1][-1]
    print(f"text generation {generation:.1f} tokens/sec on {device} (greedy, one character per call, batch 1)")
    print(f"perplexity {final.perplexity:.1f}, {final.tokens_per_s:.1f} tokens/sec on {device}")
    for text in texts:
        print(text)


def main(argv=None):
    """Entry point; returns the exit status (argparse exits with 2 on malformed options)."""
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (DemoError, data.DataError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    return 0
