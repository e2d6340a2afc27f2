"""The checkpoint engine: snapshot, fences, host buffer pool, storage levels, format, load.

It does not import ``trainer``: it sees training state through named tensors with global-shape
metadata and its small state, a dict of picklable items (``docs/architecture.md``). Built in the issues that
follow the 3D-parallel trainer.
"""
