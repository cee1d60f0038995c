"""Catalog in, shards out: the Ray Data driver, the per-chunk worker, idempotent publishing (local and object
storage) and Hugging Face datasets as a source."""
