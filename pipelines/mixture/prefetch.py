"""Threaded look-ahead over a `MixtureStream`: the same batches, built a few packs ahead in a thread pool.

Why: building a pack's tensors (image decode, bicubic resize, normalise, patchify, dense masks) is ~95% of
a pack's cost, and almost all of it runs in C code that releases the GIL (PIL decode and resize, torch
fills and copies). So a loader process can build several packs at once with threads, without the memory
and start-up cost of more loader processes.

Determinism: the main thread alone decides packs (`next_plan`, metadata only), in stream order, exactly as
the sequential path does; a worker thread reads the decided pack's shard rows (a thread-safe row-group
cache; reading 1-2 MB rows of `store_pixels` shards is a large share of a pack) and runs the pure function
`build_packed_batch(samples, packing, tokenizer, seed)`. Batches are handed out in
pack order, so the output is bit-for-bit the sequential `iter(stream)` output whatever the thread timing.

Resume: `state_dict()` is the position after the last batch *handed out* (its `stream_state`), not the
underlying stream's position, which runs up to `lookahead` packs ahead. Loading a state drops the
look-ahead and restarts from that state, so a resumed run yields exactly the batches an uninterrupted
one would have.
"""
from __future__ import annotations

import copy
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:   # pragma: no cover
    from pipelines.packing.packed_batch import PackedBatch


class PlanSource(Protocol):
    """What the look-ahead needs of a stream (`pipelines.mixture.stream.MixtureStream` is one): named here,
    not imported, because the stream builds its look-ahead from this module."""

    tokenizer: Any

    def next_plan(self) -> Any: ...

    def materialise(self, plan: Any, tokenizer: Any = None) -> "PackedBatch": ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class _LockedTokenizer:
    """The stream's tokenizer with encode calls serialised: a transformers fast tokenizer may raise
    'Already borrowed' when two threads use it at once. Tokenising is ~2% of a pack, so the lock is cheap."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._lock = threading.Lock()

    def encode(self, text: str) -> list[int]:
        with self._lock:
            return self._tokenizer.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        with self._lock:
            return self._tokenizer.encode_batch(texts)

    def __getattr__(self, name: str) -> Any:   # special ids, name, ...: read-only
        return getattr(self._tokenizer, name)


class PrefetchingBatches:
    """Iterator of `PackedBatch`es of `stream`, `lookahead` packs ahead, built by `threads` threads.

    `threads=0` builds in the calling thread (no pool, no look-ahead): the sequential reference path.
    """

    def __init__(self, stream: PlanSource, threads: int = 2, lookahead: int | None = None) -> None:
        if threads < 0:
            raise ValueError(f"threads must be >= 0, got {threads}")
        self.stream = stream
        self.threads = threads
        self.lookahead = 0 if threads == 0 else max(1, lookahead if lookahead is not None else threads + 1)
        self._pool = (ThreadPoolExecutor(max_workers=threads, thread_name_prefix="medloom-pack")
                      if threads else None)
        self._queue: deque[Future] = deque()
        self._tokenizer = _LockedTokenizer(stream.tokenizer)
        self._error: BaseException | None = None   # a read/plan error met while topping up, raised in order
        self._warm = False
        self._state = stream.state_dict()

    # -- iteration ---------------------------------------------------------------------------------
    def __iter__(self) -> "PrefetchingBatches":
        return self

    def _submit(self) -> None:
        plan = self.stream.next_plan()                              # main thread: stream order
        self._queue.append(self._pool.submit(self._build, plan))

    def _build(self, plan: Any) -> "PackedBatch":
        """Worker thread: read the pack's rows, then build its tensors (errors surface at its place)."""
        return self.stream.materialise(plan, self._tokenizer)

    def _top_up(self) -> None:
        """Fill the look-ahead. An error deciding a later pack is kept and raised only when that pack is due,
        so the batches before it are still handed out (as the sequential path would); an error reading or
        building one surfaces from its future, at the same place."""
        while self._error is None and len(self._queue) < self.lookahead:
            try:
                self._submit()
            except Exception as exc:
                self._error = exc

    def __next__(self) -> "PackedBatch":
        if self._pool is None:
            batch = self.stream.materialise(self.stream.next_plan())
        else:
            if not self._queue and self._error is not None:
                error, self._error = self._error, None
                raise error
            if not self._queue and not self._warm:   # first call (or after a resume): one pack, no look-ahead
                self._submit()
                batch = self._queue.popleft().result()
                self._warm = True
            else:                                    # read the next packs' rows while the workers build
                if not self._queue:
                    self._submit()
                head = self._queue.popleft()
                self._top_up()
                batch = head.result()                # re-raises a build error at its place in the order
        self._state = batch.stream_state
        return batch

    def wait_idle(self) -> None:
        """Block until every pack already in the look-ahead is built (they stay queued, in order). For
        benchmarks that alternate loaders: the background work is charged to this loader's time slice."""
        for fut in list(self._queue):
            fut.exception()

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch handed out (what a checkpoint must store)."""
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: Any) -> None:
        """Drop the look-ahead and continue from `state` (same forms as `MixtureStream.load_state_dict`)."""
        self._drain()
        self._error = None
        self._warm = False
        self.stream.load_state_dict(state)
        self._state = self.stream.state_dict()

    def _drain(self) -> None:
        while self._queue:
            fut = self._queue.popleft()
            if not fut.cancel():
                try:
                    fut.result()
                except Exception:   # a dropped look-ahead pack's error is not the caller's any more
                    pass

    def close(self) -> None:
        """Stop the threads (pending look-ahead is discarded)."""
        self._drain()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> "PrefetchingBatches":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:   # best effort: idle threads would otherwise live until exit
        pool = getattr(self, "_pool", None)
        if pool is not None:
            try:
                pool.shutdown(wait=False, cancel_futures=True)
            except Exception:   # interpreter shutdown: modules already torn down
                pass
