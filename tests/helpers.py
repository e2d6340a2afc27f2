"""Helpers shared by several test files (``from tests.helpers import ...``): a free TCP port, the
removal of the shared-memory segments a test made, and a synthetic checkpointable state with an
engine around it. Plain functions and classes; the fixtures that use them live in the test files
(and ``tests/conftest.py``). Nothing here imports megatron-core or the trainer."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import time
from collections.abc import Iterator

import torch

SHARDS = 4


PORTS_PER_WORKER = 2000
FIRST_PORT = 10000


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, for a job to listen on.

    Taken below the range the OS hands out to outgoing connections (``ip_local_port_range``,
    32768 and up here), so that no connection of a test running beside it takes the port
    between now and the job's bind, and from a slice of its own per pytest-xdist worker, so
    that the other worker's jobs do not either (an OS-picked port was seen taken so: EADDRINUSE)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    index = int(worker[2:]) if worker[:2] == "gw" and worker[2:].isdigit() else 0
    first = FIRST_PORT + (index % 10) * PORTS_PER_WORKER
    for _ in range(200):
        port = random.randrange(first, first + PORTS_PER_WORKER)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # the slice is full: let the OS pick
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


JOB_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""What torchrun (or the ``single_process_group`` fixture) sets for a job: a process started as a
job of its own must not inherit them (it would try to bind the test process's port)."""


def job_env(**extra: str) -> dict[str, str]:
    """The environment for a 1-process job started by a test: this one, without another job's
    rendezvous variables, with one OpenMP thread and the CPU forced."""
    env = {k: v for k, v in os.environ.items() if k not in JOB_VARIABLES}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "GPT_FORCE_CPU": "1"})
    env.update(extra)
    return env


@contextlib.contextmanager
def shared_memory_removed_after() -> Iterator[None]:
    """Remove, on exit, every checkpoint shared-memory segment (``/dev/shm/gptckpt-*``: L0 pools
    and their descriptions) that appeared inside the block. Engines and jobs keep their pools on
    purpose (they outlive a crash); a test's would pile up on the machine.

        pytestmark = pytest.mark.usefixtures("pools_removed")   # tests/conftest.py
    """
    from checkpointing.storage import host_pool

    before = set(host_pool.list_segments())
    try:
        yield
    finally:
        for path in set(host_pool.list_segments()) - before:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def synthetic_layout(data_parallel: int = 1, tensor_parallel: int = 1):
    """The layout a synthetic state records (data parallel over its ranks), or another one."""
    from checkpointing.base.parallel_layout import ParallelLayout

    return ParallelLayout(tensor_parallel=tensor_parallel, pipeline_parallel=1, data_parallel=data_parallel,
                          distributed_optimizer=False, num_layers=1, bf16=False)


class SyntheticState:
    """A checkpointable state for engine tests: two flat arrays ``a`` and ``b`` in ``shards``
    shards of ``shard_numel`` elements, one piece per array and shard.

    With ``world_size`` > 1 it is rank ``rank``'s part of global tensors of ``world_size`` times
    the size (the ranks' pieces tile them); its values depend on the rank, and rank 0 captures the
    ``common`` object. The values are a pure function of (``rank``, number of steps), so any rank
    can rebuild another's state after N steps (:meth:`after_steps`)."""

    def __init__(self, shard_numel: int = 1 << 14, shards: int = SHARDS, device: str = "cpu",
                 rank: int = 0, world_size: int = 1):
        from checkpointing.format.items import TensorPiece

        n = shards * shard_numel
        self.rank = rank
        g = torch.Generator(device=device).manual_seed(rank)
        self.arrays = {name: torch.randn(n, generator=g, device=device) for name in ("a", "b")}
        self.shards = [(i * shard_numel, (i + 1) * shard_numel) for i in range(shards)]
        self.save_pieces = [TensorPiece(name, name, lo, (hi - lo,), (world_size * n,), (rank * n + lo,))
                            for name in self.arrays for lo, hi in self.shards]
        self.load_arrays, self.load_pieces = self.arrays, self.save_pieces
        self.layout = synthetic_layout(world_size)
        self.zero_copy_refusal = None  # its step can write out of place (``optimizer_step``)

    def capture_small_state(self, iteration):
        return {"common": {"iteration": iteration}} if self.rank == 0 else {f"rank{self.rank}": iteration}

    def optimizer_step(self, engine=None, on_shard=None):
        """Update shard by shard behind the engine's fences, as the optimizer does (without an
        engine: no fences). With a zero-copy engine the step writes out of place into the slot
        the engine gives, which then holds the state."""
        out = engine.begin_step() if engine is not None and engine.zero_copy else None
        for index, (lo, hi) in enumerate(self.shards):
            if engine is not None:
                engine.fence(index)
            if on_shard:
                on_shard(index)
            for name, array in self.arrays.items():
                if out is None:
                    array[lo:hi].mul_(0.5).add_(1.0)
                else:
                    torch.mul(array[lo:hi], 0.5, out=out[name][lo:hi]).add_(1.0)
        if out is not None:
            self.arrays = self.load_arrays = out
        if engine is not None and engine.zero_copy:
            engine.end_step()

    @classmethod
    def after_steps(cls, steps: int, **kwargs) -> "SyntheticState":
        """The state (same arguments as the constructor) after ``steps`` optimizer steps."""
        state = cls(**kwargs)
        for _ in range(steps):
            state.optimizer_step()
        return state


def process_gone(pid: int, within: float = 20.0) -> bool:
    """Whether process ``pid`` has ended (a zombie not yet reaped by its parent counts as ended;
    it is not reaped here, so that its parent still learns its exit status). A killed process's
    leader shows as a zombie while its other threads still exit: good enough to say it ends."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def make_engine(tmp_path, group, state, slots=2, interval=1, budget=None, tag=None, zero_copy=False,
                flusher_timeout=60.0):
    """An engine over ``state`` with one level, L2 in ``tmp_path / "l2"`` every ``interval``
    versions, and an L0 pool of ``slots`` slots (``zero_copy``: the state's steps write into
    them); returns it and the list its log lines go to."""
    from checkpointing.base.levels import Level
    from checkpointing.engine.checkpoint_engine import CheckpointEngine
    from checkpointing.storage.host_pool import ArraySpec, HostPool

    specs = {k: ArraySpec(v.numel(), v.dtype) for k, v in state.arrays.items()}
    pool = HostPool(tag or f"test-{os.getpid()}-{time.monotonic_ns()}", 0, specs, slots, budget)
    logs: list[str] = []
    engine = CheckpointEngine(state, pool, [Level("L2", str(tmp_path / "l2"), interval, None)], group, logs.append,
                              zero_copy=zero_copy, flusher_timeout=flusher_timeout)
    return engine, logs


class PickleMarker:
    """Unpickling it creates ``path``: stands for any code a planted pickle would run (the
    security tests check that the file never appears)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))
