"""Ray Data ingest, the training stream, sequence packing and image I/O."""
