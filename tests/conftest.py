import os

import pytest
import torch.distributed as dist

# The slow tier: modules whose tests start processes (torchrun jobs, trainers, fault trials) or
# train end to end. `scripts/run_tests.sh -m "not slow"` runs the rest, the unit tier (about a
# minute on 2 cores); the README's test command and CI run both. A single slow test in a unit
# module says so with @pytest.mark.slow.
SLOW_MODULES = frozenset({
    "test_async_checkpoint_e2e", "test_checkpoint_errors", "test_checkpoint_resume", "test_fault_exit",
    "test_fault_trials", "test_hf_interop", "test_load_paths", "test_parallel_equivalence", "test_pool_life", "test_recovery", "test_rollback", "test_security", "test_state_layout",
    "test_telemetry", "test_training_e2e", "test_two_nodes",
})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module is not None and item.module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def single_process_group():
    """A 1-process gloo group, for code that calls collectives (they are identities here)."""
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        from tests.helpers import free_port  # not trainer's: this also runs where megatron-core is not installed

        os.environ.setdefault("MASTER_PORT", str(free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
    return dist.group.WORLD


@pytest.fixture(scope="session", autouse=True)
def no_shared_memory_left_behind():
    """Jobs keep their L0 pool in /dev/shm on purpose (it outlives a crash); the test jobs' pools,
    named after temporary directories, would pile up on the machine: remove what the session made."""
    from tests.helpers import shared_memory_removed_after

    with shared_memory_removed_after():
        yield
