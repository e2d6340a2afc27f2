import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # no BLAS thread pool: this process forks the flusher template

import pytest
import torch
import torch.distributed as dist

from checkpointing.flusher_template import start_template

# The engines made in this process fork their flushers from a template, as the trainer's do; it
# is forked now, while this process has one thread (None, and flushers start their own
# interpreter, if it already has more).
start_template()

from models.megatron_import import import_megatron_core  # noqa: E402

import_megatron_core()  # as the trainer does: megatron-core's import-time torch.compile deferred

# The slow tier: each module whose tests start processes (torchrun jobs, trainers, the engine's
# flusher, fault trials) or train end to end declares `pytestmark = pytest.mark.slow` itself;
# tests/test_slow_marks.py fails where one that starts processes does not. `scripts/run_tests.sh
# -m "not slow"` runs the rest, the unit tier; the README's test command and CI run both. A
# single slow test in a unit module that starts no process says so with @pytest.mark.slow.


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


@pytest.fixture
def pools_removed():
    """The pools a test's engines made are removed after it (``tests.helpers.shared_memory_removed_after``)."""
    from tests.helpers import shared_memory_removed_after

    with shared_memory_removed_after():
        yield


@pytest.fixture(scope="module")
def megatron_state(single_process_group):
    """A 1-rank megatron-core (TP1, PP1) on CPU, for building the model in this process."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from models.cpu_compat import apply_cpu_compat

    apply_cpu_compat(torch.device("cpu"))
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)
    yield
    parallel_state.destroy_model_parallel()
