"""The Time Machine corpus and minibatch iterators of the d2l book (chapter 8), in our own code.

The text ships inside the package and is checked against its SHA-1 before use; nothing is
downloaded. Preprocessing follows the book: every run of non-letters becomes one space, lines are
stripped and lower-cased, split into characters and concatenated with no separator; the vocabulary
is built from the whole text (`<unk>` at 0, then by falling frequency) and the corpus is cut to its
first `max_tokens` indices.
"""
import collections
import hashlib
import pathlib
import random
import re
from importlib import resources

import torch

DATA_SHA1 = "090b5e7e70c295757f55df93cb0a180b9691891a"
MAX_TOKENS = 10000


class DataError(Exception):
    """The corpus file is missing, unreadable or not the expected text."""


def default_data_path():
    """Path of the copy of the text shipped with the package."""
    return resources.files(__package__).joinpath("timemachine.txt")


def read_lines(path=None):
    """Lines of the text after the book's cleaning (letters and single spaces, lower case)."""
    path = default_data_path() if path is None else pathlib.Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read the Time Machine text {path}: {err.strerror or err}") from None
    digest = hashlib.sha1(raw).hexdigest()
    if digest != DATA_SHA1:
        raise DataError(f"{path} is not the expected Time Machine text (SHA-1 {digest}, expected {DATA_SHA1})")
    return [re.sub("[^A-Za-z]+", " ", line).strip().lower() for line in raw.decode("utf-8").splitlines()]


class Vocab:
    """Token <-> index maps: `<unk>` at index 0, then tokens by descending count (ties keep first-seen order)."""

    def __init__(self, tokens):
        counts = collections.Counter(tokens)
        self.idx_to_token = ["<unk>"] + [tok for tok, _ in sorted(counts.items(), key=lambda kv: -kv[1])]
        self.token_to_idx = {tok: idx for idx, tok in enumerate(self.idx_to_token)}

    def __len__(self):
        return len(self.idx_to_token)

    def __getitem__(self, token):
        """Index of one token; unknown tokens map to `<unk>` (0)."""
        return self.token_to_idx.get(token, 0)

    def to_tokens(self, indices):
        return [self.idx_to_token[i] for i in indices]


def load_corpus(path=None, max_tokens=MAX_TOKENS):
    """(corpus, vocab): character indices of the text, cut to `max_tokens` (<= 0 keeps all)."""
    chars = [ch for line in read_lines(path) for ch in line]
    vocab = Vocab(chars)
    corpus = [vocab[ch] for ch in chars]
    return (corpus[:max_tokens] if max_tokens > 0 else corpus), vocab


def sequential_batches(corpus, batch_size, num_steps, rng):
    """Yield (X, Y) int64 pairs of shape (batch_size, num_steps), Y = X shifted by one token.

    A random offset in 0..num_steps starts the epoch; the kept tokens are laid out as `batch_size`
    rows read left to right, so row b of one minibatch continues row b of the previous one.
    """
    offset = rng.randint(0, num_steps)
    num_tokens = (len(corpus) - offset - 1) // batch_size * batch_size
    xs = torch.tensor(corpus[offset:offset + num_tokens]).reshape(batch_size, -1)
    ys = torch.tensor(corpus[offset + 1:offset + 1 + num_tokens]).reshape(batch_size, -1)
    for start in range(0, xs.shape[1] // num_steps * num_steps, num_steps):
        yield xs[:, start:start + num_steps], ys[:, start:start + num_steps]


def random_batches(corpus, batch_size, num_steps, rng):
    """Yield (X, Y) pairs of shape (batch_size, num_steps) of non-overlapping windows in random order.

    The windows start at a random offset in 0..num_steps-1; adjacent minibatches are unrelated, so
    the hidden state must be reset for each.
    """
    corpus = corpus[rng.randint(0, num_steps - 1):]
    starts = list(range(0, (len(corpus) - 1) // num_steps * num_steps, num_steps))
    rng.shuffle(starts)
    for first in range(0, len(starts) // batch_size * batch_size, batch_size):
        chosen = starts[first:first + batch_size]
        yield (torch.tensor([corpus[s:s + num_steps] for s in chosen]),
               torch.tensor([corpus[s + 1:s + 1 + num_steps] for s in chosen]))


class BatchLoader:
    """Re-iterable minibatches of one corpus; each pass is one epoch with fresh random offsets.

    `seed` fixes the sequence of epochs, so two loaders with the same seed yield identical batches.
    """

    def __init__(self, corpus, batch_size, num_steps, random_iter=False, seed=0):
        self.corpus, self.batch_size, self.num_steps = corpus, batch_size, num_steps
        self.random_iter = random_iter
        self.rng = random.Random(seed)

    def __iter__(self):
        batches = random_batches if self.random_iter else sequential_batches
        return batches(self.corpus, self.batch_size, self.num_steps, self.rng)
