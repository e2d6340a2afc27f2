"""torchrun worker (4 ranks, two "nodes" of 2): save_and_commit on a node-local level with node
groups, as the flusher calls it, against the shared level and a from-scratch node-local build.

    torchrun --nproc-per-node 4 tests/workers/node_local_commit_worker.py OUT_DIR

Rank r writes row r of ``w`` (4 x 3) and holds the DP-replicated ``b`` (3,), written by rank 0.
Each version, on each node: the ``.metadata`` of the node-local level names only the node's
files and chunks, decodes to the one built from scratch of the node's records, and
every rank reads its pieces back from its node's directory; the shared level's metadata tiles
every tensor and reads back whole. A write that fails on rank 3 at version 3 commits nothing on
either node, and every rank raises naming rank 3. Writes ``OUT_DIR/ok-<rank>`` at the end.
"""

import os
import sys
import warnings

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from checkpointing.base.durable import CheckpointWriteError  # noqa: E402
from checkpointing.base.levels import Level  # noqa: E402
from checkpointing.base.parallel_layout import ParallelLayout  # noqa: E402
from checkpointing.engine.flusher import _node_groups  # noqa: E402
from checkpointing.format.commit import save_and_commit  # noqa: E402
from checkpointing.format.items import TensorPiece  # noqa: E402
from checkpointing.format.metadata import METADATA_NAME, read_metadata  # noqa: E402
from checkpointing.format.reader import CheckpointReader  # noqa: E402
from checkpointing.format.save_plan import SavePlan  # noqa: E402
from checkpointing.format.writer import data_file_name  # noqa: E402

LAYOUT = ParallelLayout(tensor_parallel=1, pipeline_parallel=1, data_parallel=4, distributed_optimizer=True,
                        num_layers=1, bf16=False)


def fail(message: str) -> None:
    raise RuntimeError(f"rank {dist.get_rank()}: {message}")


def main() -> None:
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    node = rank // 2
    peers = [2 * node, 2 * node + 1]
    local = [data_file_name(r) for r in peers]
    pieces = [TensorPiece("w", "a", 0, (1, 3), (4, 3), (rank, 0)),
              TensorPiece("b", "a", 3, (3,), (3,), (0,), is_writer=rank == 0)]
    l1 = Level("L1", os.path.join(out, f"node{node}", "l1"), 1, None, peers)
    scratch = Level("L1", os.path.join(out, f"node{node}", "scratch"), 1, None, peers)
    l2 = Level("L2", os.path.join(out, "l2"), 1, None)
    groups = _node_groups([l1, l2], dist.group.WORLD)
    if list(groups) != ["L1"]:
        fail(f"node groups {list(groups)}, expected one for L1")
    plans = {"L1": SavePlan(), "L2": SavePlan()}
    for version in (1, 2):
        arrays = {"a": torch.cat([torch.arange(3.0) + 10 * rank + 100 * version, torch.tensor([1.0, 2, 3]) * version])}
        small = {"common": {"iteration": version}} if rank == 0 else {}
        node_dir = save_and_commit(l1, version, arrays, pieces, small, LAYOUT, dist.group.WORLD,
                                   plan=plans["L1"], node_group=groups["L1"]).path
        built = save_and_commit(scratch, version, arrays, pieces, small, LAYOUT, dist.group.WORLD).path
        shared = save_and_commit(l2, version, arrays, pieces, small, LAYOUT, dist.group.WORLD, plan=plans["L2"]).path
        if rank == peers[0]:
            metadata = read_metadata(node_dir)
            files = {i.relative_path for i in metadata.storage_data.values()}
            files |= {name for name, _, _ in metadata.gpt_ckpt["replicas"]}
            if not files <= set(local) or metadata.gpt_ckpt["local_files"] != local:
                fail(f"node {node}'s metadata names {sorted(files)}, its files are {local}")
            rows = sorted(c.offsets[0] for c in metadata.state_dict_metadata["w"].chunks)
            if rows != peers:
                fail(f"node {node}'s metadata describes rows {rows} of w, its ranks write {peers}")
            if ("common" in metadata.state_dict_metadata) != (node == 0):
                fail(f"node {node}: common {'missing' if node == 0 else 'described'}")
            scratch_metadata = read_metadata(built)
            if not (metadata == scratch_metadata and metadata.gpt_ckpt == scratch_metadata.gpt_ckpt
                    and list(metadata.storage_data) == list(scratch_metadata.storage_data)):
                fail(f"version {version}: the node's filled metadata is not the one built from scratch")
        back = {"a": torch.zeros(6)}
        CheckpointReader(node_dir).read_own_pieces(data_file_name(rank), pieces, back)
        if not torch.equal(back["a"], arrays["a"]):
            fail(f"read back from {node_dir}: {back['a'].tolist()}, saved {arrays['a'].tolist()}")
        whole = {"a": torch.zeros(6)}
        CheckpointReader(shared).read_pieces(pieces, whole)
        if not torch.equal(whole["a"], arrays["a"]):
            fail(f"read back from {shared}: {whole['a'].tolist()}")
        if len(read_metadata(shared).state_dict_metadata["w"].chunks) != 4:
            fail("the shared level's metadata does not hold every rank's row")
    os.environ["GPT_CKPT_FAULT"] = "L1.write:fail:3:3"
    try:
        save_and_commit(l1, 3, arrays, pieces, small, LAYOUT, dist.group.WORLD, plan=plans["L1"],
                        node_group=groups["L1"])
        fail("a failed write on rank 3 did not raise")
    except CheckpointWriteError as error:
        if "rank 3" not in str(error):
            fail(f"the error does not name rank 3: {error}")
    if os.path.exists(os.path.join(l1.root, "iter_0000003", METADATA_NAME)):
        fail(f"node {node} committed version 3 although rank 3's write failed")
    dist.barrier()
    open(os.path.join(out, f"ok-{rank}"), "w").close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
