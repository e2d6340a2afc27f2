"""The on-disk format: what a checkpoint holds and how it is written, found, read and committed.
A checkpoint is stock ``torch.distributed.checkpoint`` (``.metadata`` plus one data file per rank)
with per-chunk checksums; ``commit`` writes one version to one directory atomically (metadata
last), ``reader`` reads any rectangle of any tensor back (resharding). Imports only ``base``."""

from checkpointing._exports import lazy_exports

_EXPORTS = {
    "TensorPiece": "items", "LoadedParts": "items",
    "SaveResult": "commit", "save_and_commit": "commit",
    "iteration_dir": "discovery", "is_megatron_torch_dist": "discovery", "MEGATRON_METADATA_JSON": "discovery", "list_checkpoints": "discovery", "load_candidates": "discovery",
    "ChunkIndex": "load_plan", "wanted_chunks": "load_plan",
    "ChunkRecord": "metadata", "METADATA_NAME": "metadata", "METADATA_CHECKSUM_NAME": "metadata",
    "build_metadata": "metadata", "read_metadata": "metadata", "write_metadata": "metadata",
    "CheckpointReader": "reader",
    "TilingError": "rectangles", "overlap": "rectangles",
    "SavePlan": "save_plan",
    "data_file_name": "writer", "tensor_chunk_length": "writer", "write_rank_file": "writer",
}
# Public whole: item names and the metadata module are public whole.
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, modules=("keys", "metadata"))
