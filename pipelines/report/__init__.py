"""The dataset quality report: a scan of shard metadata, thumbnails decoded as the trainer decodes, plots, one
self-contained HTML page."""
