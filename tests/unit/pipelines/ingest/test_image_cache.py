"""The per-worker image cache stays within its byte budget and keeps the most recently used entries."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as hst

from pipelines.ingest.image_cache import ImageCache


@settings(max_examples=100, deadline=None)
@given(hst.lists(hst.tuples(hst.integers(0, 20), hst.integers(0, 400)), max_size=60))
def test_cache_never_holds_more_than_its_budget(puts):
    cache = ImageCache(max_bytes=1000)
    for key, size in puts:
        cache.put(key, f"value {key}", size)
        assert cache.bytes == sum(size for _, size in cache.entries.values()) <= 1000
    if puts:
        key, size = puts[-1]
        assert cache.get(key) == f"value {key}"   # the last entry put always fits (400 <= 1000)


def test_least_recently_used_goes_first():
    cache = ImageCache(max_bytes=300)
    cache.put("a", 1, 100)
    cache.put("b", 2, 100)
    cache.put("c", 3, 100)
    assert cache.get("a") == 1          # "a" is now the most recent
    cache.put("d", 4, 100)              # evicts "b", the least recently used
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3 and cache.get("d") == 4
    cache.put("huge", 5, 301)           # larger than the budget: not kept, nothing evicted
    assert cache.get("huge") is None and cache.bytes == 300
