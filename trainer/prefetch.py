"""Background batch loading so compute never waits on decoding and packing.

`Prefetcher` runs an iterator factory either in a thread (cheap; PIL/pyarrow release the GIL) or in one
torch DataLoader worker process (isolated from the training process' GIL). Each batch carries its own
`stream_state` (the stream's state right after producing it), so the trainer saves the state of the last
*consumed* batch and resume stays exact no matter how many batches sit in the queue.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable, Iterator

import torch

_END = object()


def _identity(x: Any) -> Any:
    return x


class _FactoryDataset(torch.utils.data.IterableDataset):
    def __init__(self, factory: Callable[[int, int], Iterator[Any]]) -> None:
        super().__init__()
        self.factory = factory

    def __iter__(self) -> Iterator[Any]:
        torch.set_num_threads(1)
        info = torch.utils.data.get_worker_info()
        index, count = (info.id, info.num_workers) if info is not None else (0, 1)
        return iter(self.factory(index, count))


class Prefetcher:
    """`next(p)` returns (batch, seconds waited). `mode`: "thread" (one source, `factory(0, 1)`) or "process"
    (`workers` DataLoader processes, process i iterating `factory(i, workers)`; batches come out round-robin)."""

    def __init__(self, factory: Callable[[int, int], Iterator[Any]], *, depth: int = 2, mode: str = "thread",
                 workers: int = 1, pin_memory: bool = False, timeout: float = 600.0) -> None:
        self.mode = mode
        self.depth = max(1, depth)
        self._closed = False
        if mode == "thread":
            self._q: queue.Queue = queue.Queue(maxsize=self.depth)
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, args=(factory,), name="batch-prefetch", daemon=True)
            self._thread.start()
        elif mode == "process":
            self._loader = torch.utils.data.DataLoader(
                _FactoryDataset(factory), batch_size=None, num_workers=max(1, workers), prefetch_factor=self.depth,
                collate_fn=_identity, pin_memory=pin_memory, timeout=timeout, persistent_workers=False)
            self._it = iter(self._loader)
        else:
            raise ValueError(f"unknown prefetch mode {mode!r}")

    def _run(self, factory: Callable[[int, int], Iterator[Any]]) -> None:
        try:
            for item in factory(0, 1):
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._q.put(_END)
        except BaseException as exc:  # surface loader errors in the training thread
            self._q.put(exc)

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> tuple[Any, float]:
        t0 = time.perf_counter()
        if self.mode == "thread":
            item = self._q.get()
            if item is _END:
                raise StopIteration
            if isinstance(item, BaseException):
                raise RuntimeError(f"batch loader failed: {item!r}") from item
        else:
            item = next(self._it)
        return item, time.perf_counter() - t0

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.mode == "thread":
            self._stop.set()
            try:
                while True:
                    self._q.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=5)
        else:
            del self._it
            del self._loader
