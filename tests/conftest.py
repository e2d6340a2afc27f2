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
