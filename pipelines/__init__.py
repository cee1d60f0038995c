"""The data stages between a catalog and the model, one sub-package per stage.

Floors, lowest first (a sub-package imports only from the ones before it):

    storage  paths and object storage, the shard schema, the shard reader
    imaging  probe, decode, stored pixels, pixel modes, DICOM and NIfTI
    packing  drawn samples -> `PackedBatch`, the batch format the model consumes
    mixture  weighted, seeded, resumable stream of samples per rank and loader worker
    ingest   catalog -> validated Parquet shards with Ray Data
    report   the quality report over a shards folder
"""
