import os
import shutil
import tempfile

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # no BLAS thread pool: this process forks the flusher template

# Each pytest process (each pytest-xdist worker) keeps its jobs' L0 pools in a tmpfs directory of
# its own, the default of --ckpt-host-dir for it and every job it starts (read by
# checkpointing.levels at import, so set before anything imports it): the clean-ups below then
# remove only this process's pools, never those of a test running beside it in another worker.
# A directory inherited from a parent pytest (xdist's controller) is not this process's own; one
# the user set before running pytest is used as it is.
_INHERITED = os.environ.get("GPT_CKPT_HOST_DIR")
if _INHERITED is None or _INHERITED == os.environ.get("GPT_TESTS_OWN_HOST_DIR"):
    _worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    _OWN_HOST_DIR = tempfile.mkdtemp(prefix=f"gpt-tests-{_worker}-",
                                     dir="/dev/shm" if os.path.isdir("/dev/shm") else None)  # 0700
    os.environ["GPT_CKPT_HOST_DIR"] = os.environ["GPT_TESTS_OWN_HOST_DIR"] = _OWN_HOST_DIR
else:
    _OWN_HOST_DIR = None


def pytest_unconfigure(config):
    """This process's pool directory goes with it (xdist's controller's too, which runs no test)."""
    if _OWN_HOST_DIR is not None:
        shutil.rmtree(_OWN_HOST_DIR, ignore_errors=True)


import pytest  # noqa: E402 - after the host directory above is set
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from checkpointing.engine.flusher_template import start_template  # noqa: E402

# The engines made in this process fork their flushers from a template, as the trainer's do; it
# is forked now, while this process has one thread, or, in a pytest-xdist worker (which runs
# execnet's thread), started as its own interpreter.
start_template(spawn=True)

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
