"""Drawn samples -> one `PackedBatch`: sequence plans turned into tokens, patches and latents, masks, position
ids and loss indexes, with upstream's `pack_sequence` semantics."""
