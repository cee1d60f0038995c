"""The shared bottom floor: where bytes live (local disk or object storage), the shard schema that is the
only contract between the ingest and its readers, and random access to shard rows."""
