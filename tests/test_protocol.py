"""The engine-flusher messages (``checkpointing.engine.protocol``): each crosses a socket pair
whole, and anything else (another type, a wrong field, a level the flusher lacks) is refused
with an error naming it."""

import io
import pickle
import socket
from multiprocessing.connection import Connection

import pytest
import torch

from checkpointing.base.levels import Level
from checkpointing.engine import protocol
from checkpointing.engine.protocol import (
    Abort,
    Describe,
    Described,
    Done,
    Fatal,
    FlusherSpec,
    FlushJob,
    FlushResult,
    ProtocolError,
    Ready,
    Stop,
    Stopped,
)
from checkpointing.format.items import TensorPiece
from checkpointing.storage.host_pool import ArraySpec
from tests.helpers import synthetic_layout


def _pair():
    ours, theirs = socket.socketpair()
    return Connection(ours.detach()), Connection(theirs.detach())


def _spec(**changes) -> FlusherSpec:
    fields = dict(rank=0, world_size=1, store=None, store_prefix="p/", group_timeout_seconds=60.0,
                  control_path="/x.ctl", slot_paths=("/x-s0",), meta_paths=("/x-s0.meta",),
                  specs={"a": ArraySpec(8, torch.float32)}, shards=((0, 8),),
                  pieces=(TensorPiece("w", "a", 0, (8,), (8,), (0,)),),
                  levels=(Level("L1", "/l1", 2, None), Level("L2", "/l2", 4, None)), layout=synthetic_layout(), trace=False)
    fields.update(changes)
    return FlusherSpec(**fields)


MESSAGES = [
    Describe(1, 0, 10, {"common": {"iteration": 10}}),
    FlushJob(id=3, level="L2", version=10, slot=0, seq=1, forced=False),
    Stop(), Abort(),
    Ready(1.5, 4096, 0.25), Described(1, None), Described(2, "disk full"),
    Done(3, FlushResult(1024, 0.5, None, 2.5), (("flush L2", "ckpt", 1, 2, {"iteration": 10}),)), Done(4, None, ()),
    Fatal("Traceback ..."), Stopped(1.0),
]


def test_each_message_crosses_whole():
    engine_end, flusher_end = _pair()
    spec = _spec()
    protocol.send(engine_end, spec)
    got = protocol.receive(flusher_end, (FlusherSpec,))
    assert got == spec and got.level("L2").root == "/l2"
    for message in MESSAGES:
        expected = protocol.TO_FLUSHER if isinstance(message, protocol.TO_FLUSHER) else protocol.TO_ENGINE
        sender, receiver = (engine_end, flusher_end) if expected is protocol.TO_FLUSHER else (flusher_end, engine_end)
        protocol.send(sender, message)
        assert protocol.receive(receiver, expected) == message


def test_the_small_states_tensors_cross_as_bytes_bit_for_bit():
    """The RNG states' tensors cross as dtype, shape and bytes (not torch's storage reduce, which
    ``torch.save``\ s each one): equal, bit for bit, in dtype and shape, and writable."""
    engine_end, flusher_end = _pair()
    generator = torch.Generator().manual_seed(7)
    tensors = {"rng": torch.get_rng_state(), "bf16": torch.randn(3, 5, generator=generator).to(torch.bfloat16),
               "scalar": torch.tensor(2.5, dtype=torch.float64), "empty": torch.empty(0, 4, dtype=torch.int64),
               "strided": torch.arange(12, dtype=torch.int32).reshape(3, 4).t(), "flag": torch.tensor([True, False])}
    message = Describe(1, 0, 10, {"rng.0": {"torch": tensors["rng"], "tracker": dict(tensors)}})
    buffer = io.BytesIO()
    protocol._Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(message)
    assert b"_rebuild" not in buffer.getvalue() and b"_tensor_from_bytes" in buffer.getvalue()
    protocol.send(engine_end, message)
    got = protocol.receive(flusher_end, protocol.TO_FLUSHER).small_state["rng.0"]
    for name, sent in {"torch": tensors["rng"], **tensors}.items():
        value = got["torch"] if name == "torch" else got["tracker"][name]
        assert value.dtype == sent.dtype and value.shape == sent.shape and torch.equal(value, sent), name
    got["tracker"]["bf16"].add_(1)  # its own memory, writable


def test_a_message_of_another_kind_is_refused_on_both_ends():
    engine_end, flusher_end = _pair()
    with pytest.raises(ProtocolError, match="not a message of the engine-flusher protocol: \\('job', 3"):
        protocol.send(engine_end, ("job", 3, 1, 10, 0, 1, False))  # the old positional tuple
    engine_end.send_bytes(pickle.dumps(("describe", 1, 0, 10, {})))
    with pytest.raises(ProtocolError, match="unexpected message tuple"):
        protocol.receive(flusher_end, protocol.TO_FLUSHER)
    protocol.send(flusher_end, Ready(1.0, 1, 1.0))  # an answer where a request belongs
    with pytest.raises(ProtocolError, match="unexpected message Ready .*expected one of FlusherSpec, Describe"):
        protocol.receive(engine_end, protocol.TO_FLUSHER)


@pytest.mark.parametrize("build, named", [
    (lambda: FlushJob(id=3, level=1, version=10, slot=0, seq=1, forced=False), "FlushJob.level = 1"),
    (lambda: FlushJob(id=3, level="L2", version="10", slot=0, seq=1, forced=False), "FlushJob.version = '10'"),
    (lambda: FlushJob(id=3, level="L2", version=10, slot=0, seq=1, forced=1), "FlushJob.forced = 1"),
    (lambda: Describe(True, 0, 10, {}), "Describe.seq = True"),
    (lambda: Done(3, (1024, 0.5, None), ()), "Done.result = \\(1024"),
    (lambda: Described(1, 7), "Described.error = 7"),
    (lambda: _spec(rank="0"), "FlusherSpec.rank = '0'"),
    (lambda: _spec(levels=({"name": "L1"},)), "FlusherSpec.levels holds {'name': 'L1'}: expected Level"),
])
def test_a_wrong_field_is_refused_naming_it(build, named):
    with pytest.raises(ProtocolError, match=named):
        build()


def test_the_spec_takes_keywords_only():
    with pytest.raises(TypeError):
        FlusherSpec(0, 1, None, "p/", 60.0, "/x.ctl", (), (), {}, (), (), (), synthetic_layout(), False)


def test_a_job_names_a_level_the_flusher_has():
    with pytest.raises(ProtocolError, match="a job names level 'L1'; this flusher has \\['L2'\\]"):
        _spec(levels=(Level("L2", "/l2", 4, None),)).level("L1")
