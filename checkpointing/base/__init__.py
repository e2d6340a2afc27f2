"""The checkpoint's foundations, used by every layer above: typed errors, durable and private
files, fault points, agreement between ranks, the parallel layout, the storage levels' names,
the component's configuration (``CheckpointConfig``) and the job's lock on its directories.
Imports nothing from the other subpackages."""

from checkpointing._exports import lazy_exports

_EXPORTS = {
    "CheckpointConfig": "config",
    "CheckpointError": "errors", "CheckpointCorruptError": "errors", "CheckpointMismatchError": "errors",
    "CheckpointNotFoundError": "errors", "CheckpointUntrustedError": "errors", "CheckpointWriteError": "errors",
    "FlusherError": "errors",
    "ParallelLayout": "parallel_layout",
    "Level": "levels", "L0": "levels", "L1": "levels", "L2": "levels", "DISK_LEVELS": "levels", "sync_level": "levels",
    "read_tracker": "durable", "TRACKER_NAME": "durable",
    "gather_from_all": "agreement",
    "open_own": "private_files",
    "Tracer": "trace",
    "load_dcp_metadata": "safe_pickle", "load_objects": "safe_pickle",
}
# Public whole: two modules are public whole: fault points, level names.
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, modules=("faults", "levels"))
