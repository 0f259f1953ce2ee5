"""Run a stretch of small CPU ops on one thread: same bits, no thread hand-offs."""
from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def single_thread_on_cpu(device: torch.device):
    """GPTQ on CPU is thousands of tiny ops plus a few mid-sized factorisations: thread
    hand-offs cost more than they save, and under load they collapse (measured on this
    2-core machine, busy: a 1024x1024 weight 0.17 s with one thread vs 3.9 s with two;
    the 4096-column Cholesky steps 1.7 s vs 25 s)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
