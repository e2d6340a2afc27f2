"""When to checkpoint, beside training: the asynchronous engine (``CheckpointEngine``). It copies
snapshots into the L0 pool beside the next step, fences the optimizer per shard, and hands
versions to a flusher process per rank (started from a pre-imported template) that writes them
to the disk levels through ``format``'s commit. Imports ``base``, ``format`` and ``storage``."""

from checkpointing._exports import lazy_exports

_EXPORTS = {
    "CheckpointEngine": "checkpoint_engine",
    "idle_and_steal": "engine_stats", "machine_cpu_times": "engine_stats",
    "start_template": "flusher_template",
    "copy_bytes": "shard_copy",
}
# Public whole: control_block's fields: what benches read of a flusher.
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, modules=("control_block",))
