"""Using a checkpoint: the load policy over every level (``loading``), the resume from host
memory and peer replicas (``memory_recovery``), the listing of what each level holds
(``inventory``) and rollback, by relaunch (``rollback``, ``scripts/rollback.sh``) or inside the
running job (``live_rollback``, asked for through ``rollback_request``). Imports ``base``,
``format`` and ``storage``; never ``engine`` (a live rollback is handed the engine)."""

from checkpointing._exports import lazy_exports

_EXPORTS = {
    "l0_entries": "inventory", "level_entries": "inventory", "replica_entries": "inventory",
    "LiveRollbackRefused": "live_rollback", "held_steps": "live_rollback", "roll_back_live": "live_rollback",
    "RequestRefused": "rollback_request", "RollbackAnswer": "rollback_request", "RollbackRequest": "rollback_request",
    "pending": "rollback_request", "take_request": "rollback_request", "write_answer": "rollback_request",
    "asked_of_another_job": "rollback_request",
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
