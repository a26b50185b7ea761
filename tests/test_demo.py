"""The Time Machine demo (fusedrnn/demo): data facts, short training runs, CLI errors, checkpoints, and the
d2l book's own chapter-8 training code running unchanged with fusedrnn's classes substituted.

The book functions below (read/tokenise/vocabulary, sequential minibatches, RNNModel, train_ch8,
predict_ch8) are our own faithful re-implementation of the PyTorch edition, kept close to its structure
on purpose: they are the independent oracle for the demo's data pipeline and the substitution test.
"""
import collections
import contextlib
import io
import itertools
import math
import random
import re
import subprocess
import sys

import pytest
import torch
from conftest import on_backends
from torch import nn
from torch.nn import functional as F

import fusedrnn
from fusedrnn.demo import data, main
from fusedrnn.demo.model import CharLM, make_rnn
from fusedrnn.demo.train import train

NOT_INTERPRETED = ("triton",)  # a training run is far too slow in Triton's interpreter
# Fused and torch.nn training curves differ only by float32 rounding, which a few epochs of SGD amplify
# from ~1e-7 to well under this.
CURVE_RTOL = 1e-4
ERROR_PREFIX = "python -m fusedrnn.demo: error: "
TINY = ["--hidden", "16", "--layers", "2", "--epochs", "2", "--backend", "reference"]


# ---- the book's chapter-8 code, re-implemented -----------------------------------------------------------
def book_read_time_machine(path):
    with open(path) as f:
        return [re.sub("[^A-Za-z]+", " ", line).strip().lower() for line in f]


class BookVocab:
    def __init__(self, tokens):
        freqs = sorted(collections.Counter(tokens).items(), key=lambda kv: kv[1], reverse=True)
        self.idx_to_token = ["<unk>"]
        self.token_to_idx = {"<unk>": 0}
        for token, _ in freqs:
            self.token_to_idx[token] = len(self.idx_to_token)
            self.idx_to_token.append(token)

    def __len__(self):
        return len(self.idx_to_token)

    def __getitem__(self, token):
        return self.token_to_idx.get(token, 0)


def book_load_corpus(path, max_tokens=10000):
    tokens = [list(line) for line in book_read_time_machine(path)]
    vocab = BookVocab([tok for line in tokens for tok in line])
    corpus = [vocab[tok] for line in tokens for tok in line]
    return corpus[:max_tokens], vocab


def book_seq_data_iter_sequential(corpus, batch_size, num_steps):
    offset = random.randint(0, num_steps)
    num_tokens = ((len(corpus) - offset - 1) // batch_size) * batch_size
    xs = torch.tensor(corpus[offset:offset + num_tokens]).reshape(batch_size, -1)
    ys = torch.tensor(corpus[offset + 1:offset + 1 + num_tokens]).reshape(batch_size, -1)
    for i in range(0, num_steps * (xs.shape[1] // num_steps), num_steps):
        yield xs[:, i:i + num_steps], ys[:, i:i + num_steps]


class BookSeqDataLoader:
    def __init__(self, corpus, batch_size, num_steps):
        self.corpus, self.batch_size, self.num_steps = corpus, batch_size, num_steps

    def __iter__(self):
        return book_seq_data_iter_sequential(self.corpus, self.batch_size, self.num_steps)


class BookRNNModel(nn.Module):
    def __init__(self, rnn_layer, vocab_size):
        super().__init__()
        self.rnn = rnn_layer
        self.vocab_size = vocab_size
        self.num_hiddens = self.rnn.hidden_size
        self.num_directions = 2 if self.rnn.bidirectional else 1
        self.linear = nn.Linear(self.num_hiddens * self.num_directions, self.vocab_size)

    def forward(self, inputs, state):
        X = F.one_hot(inputs.T.long(), self.vocab_size).to(torch.float32)
        Y, state = self.rnn(X, state)
        return self.linear(Y.reshape((-1, Y.shape[-1]))), state

    def begin_state(self, device, batch_size=1):
        shape = (self.num_directions * self.rnn.num_layers, batch_size, self.num_hiddens)
        if not isinstance(self.rnn, nn.LSTM):
            return torch.zeros(shape, device=device)
        return torch.zeros(shape, device=device), torch.zeros(shape, device=device)


def book_predict_ch8(prefix, num_preds, net, vocab, device):
    state = net.begin_state(batch_size=1, device=device)
    outputs = [vocab[prefix[0]]]
    get_input = lambda: torch.tensor([outputs[-1]], device=device).reshape((1, 1))
    for y in prefix[1:]:
        _, state = net(get_input(), state)
        outputs.append(vocab[y])
    for _ in range(num_preds):
        y, state = net(get_input(), state)
        outputs.append(int(y.argmax(dim=1).reshape(1)))
    return "".join(vocab.idx_to_token[i] for i in outputs)


def book_grad_clipping(net, theta):
    params = [p for p in net.parameters() if p.requires_grad]
    norm = torch.sqrt(sum(torch.sum(p.grad ** 2) for p in params))
    if norm > theta:
        for param in params:
            param.grad[:] *= theta / norm


def book_train_epoch_ch8(net, train_iter, loss, updater, device, use_random_iter):
    state = None
    total, count = 0.0, 0
    for X, Y in train_iter:
        if state is None or use_random_iter:
            state = net.begin_state(batch_size=X.shape[0], device=device)
        elif isinstance(net, nn.Module) and not isinstance(state, tuple):
            state.detach_()  # in place, as the book does: the module's returned state must allow it
        else:
            for s in state:
                s.detach_()
        y = Y.T.reshape(-1)
        X, y = X.to(device), y.to(device)
        y_hat, state = net(X, state)
        l = loss(y_hat, y.long()).mean()
        updater.zero_grad()
        l.backward()
        book_grad_clipping(net, 1)
        updater.step()
        total += float(l.detach() * y.numel())
        count += y.numel()
    return math.exp(total / count)


def book_train_ch8(net, train_iter, vocab, lr, num_epochs, device):
    """Returns the perplexity of every epoch and the two final predictions (the book prints them)."""
    loss = nn.CrossEntropyLoss()
    updater = torch.optim.SGD(net.parameters(), lr)
    ppls = [book_train_epoch_ch8(net, train_iter, loss, updater, device, False) for _ in range(num_epochs)]
    return ppls, [book_predict_ch8(prefix, 50, net, vocab, device) for prefix in ("time traveller", "traveller")]


# ---- helpers -------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: a second OpenMP thread buys nothing and, on a busy 2-core machine, can make
    every small op wait for a descheduled thread (10x slower measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_main(argv):
    """(exit status, stdout, stderr) of the demo's main(argv) run in-process, progress bars silenced."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(argv)
        except SystemExit as exc:
            status = exc.code
    return status, out.getvalue(), err.getvalue()


def assert_one_line_error(status, err, *fragments):
    assert status not in (0, None)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def corrupted_text(tmp_path):
    path = tmp_path / "timemachine.txt"
    raw = bytearray(data.default_data_path().read_bytes())
    raw[1000] ^= 0x20  # flip one letter's case: still valid text, no longer the book's
    path.write_bytes(bytes(raw))
    return path


# ---- data ----------------------------------------------------------------------------------------------------
def test_corpus_facts_match_the_book():
    lines = data.read_lines()
    corpus, vocab = data.load_corpus()
    assert sum(len(line) for line in lines) == 170_580
    assert len(vocab) == 28 and vocab.idx_to_token[:3] == ["<unk>", " ", "e"]
    assert sorted(vocab.idx_to_token[1:]) == [" "] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    assert len(corpus) == 10_000
    book_corpus, book_vocab = book_load_corpus(data.default_data_path())
    assert corpus == book_corpus and vocab.idx_to_token == book_vocab.idx_to_token


def test_sequential_epochs_have_8_minibatches_and_8960_targets_whatever_the_offset():
    corpus, _ = data.load_corpus()
    for offset in range(36):
        random.seed(offset)
        expected = list(book_seq_data_iter_sequential(corpus, 32, 35))
        batches = list(data.sequential_batches(corpus, 32, 35, random.Random(offset)))
        assert len(batches) == 8 and sum(y.numel() for _, y in batches) == 8_960
        assert all(torch.equal(x, bx) and torch.equal(y, by) for (x, y), (bx, by) in zip(batches, expected))
        for (x, y), (next_x, _) in itertools.pairwise(batches):
            assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(next_x[:, 0], y[:, -1])


def test_random_minibatches_are_disjoint_shifted_windows():
    corpus, _ = data.load_corpus()
    batches = list(data.random_batches(corpus, 32, 35, random.Random(3)))
    windows = {tuple(row.tolist()) for x, _ in batches for row in x}
    assert len(batches) == 8 and len(windows) == 32 * 8
    for x, y in batches:
        assert x.shape == y.shape == (32, 35) and torch.equal(x[:, 1:], y[:, :-1])


def test_loaders_with_one_seed_repeat_their_epochs():
    corpus, _ = data.load_corpus()
    first, second = (data.BatchLoader(corpus, 4, 7, seed=5) for _ in range(2))
    for _ in range(3):
        assert all(torch.equal(a[0], b[0]) for a, b in zip(first, second))


def test_missing_or_corrupted_text_is_refused(tmp_path, corrupted_text):
    with pytest.raises(data.DataError, match="cannot read"):
        data.load_corpus(tmp_path / "absent.txt")
    with pytest.raises(data.DataError, match="SHA-1"):
        data.load_corpus(corrupted_text)


# ---- training ------------------------------------------------------------------------------------------------
@on_backends(exclude=NOT_INTERPRETED)
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_short_run_learns_and_follows_torch_nn(cell, backend):
    corpus, vocab = data.load_corpus()
    torch.manual_seed(1)
    fused = CharLM(make_rnn(cell, len(vocab), 24, 2, fused=True, backend=backend), len(vocab))
    baseline = CharLM(make_rnn(cell, len(vocab), 24, 2, fused=False), len(vocab))
    baseline.load_state_dict(fused.state_dict())
    curves = [train(net, data.BatchLoader(corpus, 32, 35, seed=2), 4, 1.0, "cpu", progress=False)
              for net in (fused, baseline)]
    assert fused.rnn.last_backend == backend
    fused_ppl, torch_ppl = ([s.perplexity for s in curve] for curve in curves)
    assert fused_ppl[-1] < 0.85 * fused_ppl[0]
    assert fused_ppl == pytest.approx(torch_ppl, rel=CURVE_RTOL)


@pytest.mark.parametrize("order", [[], ["--random-iter"]])
def test_compare_prints_matching_curves_and_the_book_lines(order):
    status, out, _ = run_main([*TINY, "--epochs", "3", "--compare", *order])
    assert status == 0
    lines = out.splitlines()
    fused_ppl, torch_ppl = (float(v) for v in next(ln for ln in lines if ln.startswith("final perplexity")).split()[2:])
    assert fused_ppl == pytest.approx(torch_ppl, rel=CURVE_RTOL)
    gap = float(re.search(r"difference of (\S+)$", next(ln for ln in lines if ln.startswith("curves agree"))).group(1))
    assert gap < CURVE_RTOL
    assert re.fullmatch(r"perplexity \d+\.\d, \d+\.\d tokens/sec on cpu", lines[-3])
    assert lines[-2].startswith("time traveller") and len(lines[-2]) == len("time traveller") + 50
    assert lines[-1].startswith("traveller") and len(lines[-1]) == len("traveller") + 50


def test_plot_is_written(tmp_path):
    status, _, _ = run_main([*TINY, "--epochs", "1", "--compare", "--plot", str(tmp_path / "ppl.png")])
    assert status == 0 and (tmp_path / "ppl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- checkpoints ---------------------------------------------------------------------------------------------
def test_checkpoint_loads_into_the_books_torch_nn_model_and_back(tmp_path):
    ckpt = tmp_path / "demo.pt"
    status, out, _ = run_main([*TINY, "--save", str(ckpt)])
    assert status == 0
    _, vocab = book_load_corpus(data.default_data_path())
    book_net = BookRNNModel(nn.LSTM(len(vocab), 16, 2), len(vocab))
    book_net.load_state_dict(torch.load(ckpt, weights_only=True))
    printed = out.splitlines()[-2:]
    assert [book_predict_ch8(p, 50, book_net, vocab, "cpu") for p in ("time traveller", "traveller")] == printed

    torch.save(book_net.state_dict(), tmp_path / "book.pt")
    status, out, _ = run_main([*TINY, "--load", str(tmp_path / "book.pt"), "--save", str(tmp_path / "again.pt")])
    assert status == 0
    assert torch.load(tmp_path / "again.pt", weights_only=True).keys() == book_net.state_dict().keys()


def test_checkpoint_of_another_shape_is_refused(tmp_path):
    ckpt = tmp_path / "small.pt"
    torch.save(CharLM(nn.LSTM(28, 16, 2), 28).state_dict(), ckpt)
    for argv, fragment in [(["--hidden", "32"], "(64, 28), expected (128, 28)"),
                           (["--layers", "1"], "unexpected rnn.bias_hh_l1"),
                           (["--cell", "gru"], "(64, 28), expected (48, 28)")]:
        status, _, err = run_main([*TINY, *argv, "--load", str(ckpt)])
        assert_one_line_error(status, err, "does not fit the model", fragment)


# ---- command-line errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, fragment", [
    (["--cell", "lstn"], "invalid choice: 'lstn'"),
    (["--layers", "0"], "--layers"),
    (["--hidden", "-4"], "--hidden"),
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "two"], "invalid int value"),
    (["--num-steps", "0"], "--num-steps"),
    (["--lr", "nan"], "--lr"),
    (["--backend", "fast"], "invalid choice: 'fast'"),
    (["--bogus"], "unrecognized arguments"),
])
def test_malformed_options_exit_2_with_one_line(argv, fragment):
    status, _, err = run_main(argv)
    assert status == 2
    assert_one_line_error(status, err, fragment)


def test_unusable_inputs_exit_1_with_one_line(tmp_path, corrupted_text):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    cases = [
        (["--data", str(tmp_path / "absent.txt")], "cannot read"),
        (["--data", str(corrupted_text)], "SHA-1"),
        (["--load", str(tmp_path / "absent.pt")], "cannot load checkpoint"),
        (["--load", str(garbage)], "cannot load checkpoint"),
        (["--device", "nonsense"], "device 'nonsense'"),
        (["--batch-size", "300"], "does not fit"),
        (["--plot", str(tmp_path / "no" / "dir.png")], "does not exist"),
        (["--plot", str(tmp_path / "ppl.xyz")], "unknown image format"),
        (["--save", str(tmp_path / "no" / "dir.pt")], "does not exist"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "device 'cuda'"))
    if "cuda" not in fusedrnn.available_backends("cpu"):
        cases.append((["--backend", "cuda", "--device", "cpu"], "backend 'cuda' cannot run on cpu"))
    for argv, fragment in cases:
        status, out, err = run_main([*TINY, *argv])
        assert status == 1, argv
        assert_one_line_error(status, err, fragment)
        assert "perplexity" not in out


def test_command_line_error_has_no_traceback(corrupted_text):
    result = subprocess.run([sys.executable, "-m", "fusedrnn.demo", "--data", str(corrupted_text)],
                            check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    assert_one_line_error(result.returncode, result.stderr, "SHA-1")


# ---- the book's code with fusedrnn substituted -----------------------------------------------------------
@pytest.mark.parametrize("cls_name", ["LSTM", "GRU"])
def test_books_training_code_runs_unchanged_with_fusedrnn(cls_name):
    corpus, vocab = book_load_corpus(data.default_data_path())
    results = []
    for rnn_cls in (getattr(fusedrnn, cls_name), getattr(nn, cls_name)):
        torch.manual_seed(4)
        random.seed(4)
        net = BookRNNModel(rnn_cls(len(vocab), 32, num_layers=2), len(vocab))
        results.append(book_train_ch8(net, BookSeqDataLoader(corpus, 32, 35), vocab, 1.0, 3, "cpu"))
    (fused_ppl, fused_text), (torch_ppl, torch_text) = results
    assert fused_ppl == pytest.approx(torch_ppl, rel=CURVE_RTOL)
    assert fused_ppl[-1] < fused_ppl[0]
    assert fused_text == torch_text
