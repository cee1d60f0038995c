"""The training stream: an upstream dataset YAML resolved against catalog and shards, a seeded order of
passes split across streams, and packs built from it, resumable from a small JSON state."""
