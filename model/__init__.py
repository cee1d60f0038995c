"""The BAGEL / UniMedVL unified model, its configs and checkpoint I/O (see model/README.md)."""
