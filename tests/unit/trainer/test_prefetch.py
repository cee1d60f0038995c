"""trainer.prefetch: the background loader keeps order, hides latency and surfaces loader errors."""
from __future__ import annotations

import time

import pytest

from trainer.prefetch import Prefetcher


def test_prefetch_thread_keeps_order_and_hides_latency():
    def slow():
        for i in range(6):
            time.sleep(0.02)
            yield i

    p = Prefetcher(lambda i, n: slow(), depth=4, mode="thread")
    got, waits = [], []
    time.sleep(0.15)           # "compute" while the loader fills the queue
    for _ in range(4):
        item, w = next(p)
        got.append(item)
        waits.append(w)
    p.close()
    assert got == [0, 1, 2, 3] and max(waits) < 0.02


def test_prefetch_surfaces_loader_errors():
    def broken():
        yield 1
        raise OSError("corrupt shard")

    p = Prefetcher(lambda i, n: broken(), depth=2, mode="thread")
    assert next(p)[0] == 1
    with pytest.raises(RuntimeError, match="corrupt shard"):
        next(p)
    p.close()
