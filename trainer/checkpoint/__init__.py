"""Checkpoints of a training run: the upstream directory layout plus per-rank optimizer and stream state,
written atomically on local disk (`local`) or, with no rename to lean on, on object storage (`remote`)."""
