"""Images from file to pixels: the header probe of the ingest, the one decoder the trainer, report and
inference share, pre-resized pixels, unusual pixel modes, and the DICOM and NIfTI readers."""
