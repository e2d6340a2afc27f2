import os

import pytest
import torch.distributed as dist


@pytest.fixture(scope="session")
def single_process_group():
    """A 1-process gloo group, for code that calls collectives (they are identities here)."""
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        from tests.launch import free_port  # not trainer's: this also runs where megatron-core is not installed

        os.environ.setdefault("MASTER_PORT", str(free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
    return dist.group.WORLD


@pytest.fixture(scope="session", autouse=True)
def no_shared_memory_left_behind():
    """Jobs keep their L0 pool in /dev/shm on purpose (it outlives a crash); the test jobs' pools,
    named after temporary directories, would pile up on the machine: remove what the session made."""
    from checkpointing import host_pool

    before = set(host_pool.list_segments())
    yield
    for path in set(host_pool.list_segments()) - before:
        os.unlink(path)
