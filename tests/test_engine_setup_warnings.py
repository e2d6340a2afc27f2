"""The start-up warning for a disk level written every iteration with a large state."""

from checkpointing.base.levels import L1, L2, Level
from checkpointing.engine.engine_setup import every_iteration_warnings


def test_a_disk_level_every_iteration_is_warned_of_only_for_a_large_state():
    levels = [Level(L1, "/local", 1, 2), Level(L2, "/lustre/ckpt", 1, None)]
    warnings = every_iteration_warnings(levels, 400_000_000, 3)
    assert len(warnings) == 2 and "--ckpt-local-interval" in warnings[0]
    assert "L2 (/lustre/ckpt) is written every iteration: 400 MB per iteration from rank 3" in warnings[1]
    assert "--ckpt-persistent-interval" in warnings[1]
    assert every_iteration_warnings(levels, 40_000_000, 3) == []
    assert every_iteration_warnings([Level(L2, "/lustre/ckpt", 10, None)], 400_000_000, 3) == []
