"""Thread safety: two Python threads run different fused modules at the same time, on every available
CPU backend, and each gets exactly the results it gets alone (the backends are deterministic, see
test_determinism.py, so "correct" is bitwise equality with a serial run)."""

import threading

import pytest
import torch
from conftest import make_pair, on_backends, random_hx, random_input, require, run_model

ROUNDS = 4
# The Triton interpreter patches triton.language globally while it runs a program: not for threads.
NOT_THREADED = ("triton",)


def _job(cell, backend, device):
    """(model, x, hx) for one thread; different cells, sizes and layer counts per job."""
    sizes = {"lstm": (5, 16, 7, 24, 2), "gru": (7, 8, 5, 33, 1), "rnn_tanh": (6, 4, 9, 16, 3)}[cell]
    T, B, I, H, layers = sizes
    model = make_pair(cell, I, H, backend, num_layers=layers, bidirectional=True, device=device)[0]
    x = random_input(T, B, I, dtype=torch.float32).to(device).requires_grad_()
    hx = random_hx(cell, 2 * layers, B, H, dtype=torch.float32)
    hx = tuple(h.to(device).requires_grad_() for h in hx) if cell == "lstm" else hx.to(device).requires_grad_()
    return model, x, hx


def _equal(a, b):
    return all(torch.equal(p, q) for kind in ("out", "grad") for p, q in zip(a[kind], b[kind]))


def run_concurrently(jobs):
    """Run every job ROUNDS times, one thread per job, all starting together; return the failures."""
    alone = [run_model(*job) for job in jobs]
    start = threading.Barrier(len(jobs))
    failures = []

    def worker(job, expected):
        try:
            start.wait()
            for round_ in range(ROUNDS):
                if not _equal(run_model(*job), expected):
                    failures.append(f"{type(job[0]).__name__}: round {round_} differs from the serial run")
        except Exception as error:  # noqa: BLE001  (reported by the test, with the thread it came from)
            failures.append(f"{type(job[0]).__name__}: {error!r}")

    threads = [threading.Thread(target=worker, args=pair) for pair in zip(jobs, alone)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failures


@on_backends("cpu", exclude=NOT_THREADED)
def test_two_threads_two_modules(backend):
    jobs = [_job("lstm", backend, "cpu"), _job("gru", backend, "cpu")]
    assert run_concurrently(jobs) == []


def test_two_threads_two_backends():
    """The fast CPU backend and the reference side by side."""
    require("cpp", "cpu", torch.float32, "rnn_tanh")
    jobs = [_job("lstm", "reference", "cpu"), _job("rnn_tanh", "cpp", "cpu")]
    assert run_concurrently(jobs) == []


@pytest.mark.parametrize("device", ["cuda"])  # the backend fixture checks the backend runs there
@on_backends("cuda", exclude=("reference",))
def test_two_threads_two_modules_gpu(backend, device):
    jobs = [_job("lstm", backend, device), _job("gru", backend, device)]
    assert run_concurrently(jobs) == []
