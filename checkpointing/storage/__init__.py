"""Host memory as a storage level: the L0 pool of shared-memory slots (``host_pool``), the peer
replicas that copy a rank's slots to partners on other nodes (``peer_replicas``) and the map of
which ranks share a node (``peers``). Imports ``base`` and ``format``."""

from checkpointing._exports import lazy_exports

_EXPORTS = {
    "ArraySpec": "host_pool", "HostPool": "host_pool", "list_segments": "host_pool", "remove_pool": "host_pool",
    "remove_segments": "host_pool",
}
# Public whole: host_pool's module is public: `python -m checkpointing.storage.host_pool`.
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, modules=("host_pool",))
