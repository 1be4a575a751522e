"""Test-session settings: one intra-op thread per pytest worker.

``make test`` runs two xdist workers on two cores; letting each also start a thread per core
oversubscribes the machine and makes the many tiny ops in these tests several times slower.
Subprocesses (examples) inherit the same limit through the environment.
"""

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("LIGHTNING_INFLUENCE_PROGRESS", "0")
torch.set_num_threads(1)


@pytest.fixture()
def float64_default():
    """Run a test with float64 as the default dtype (explicit references need it)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _free_port_in(low: int, high: int) -> int:
    import socket

    for port in range(low, high):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in [{low}, {high})")


@pytest.fixture(autouse=True)
def _own_master_port(worker_id):
    """Each test gets a free ``MASTER_PORT`` from its xdist worker's own range. Lightning caches
    the port it picks for ``ddp_spawn`` in ``os.environ``; two workers' tests could otherwise meet
    on one port (one worker reusing its cached port, the other picking it as free), and the
    processes of both jobs then abort in gloo ("terminate called without an active exception")."""
    n = int(worker_id[2:]) if worker_id.startswith("gw") else 0
    low = 30000 + 500 * n
    os.environ["MASTER_PORT"] = str(_free_port_in(low, low + 500))
    yield
    os.environ.pop("MASTER_PORT", None)
