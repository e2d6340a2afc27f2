"""torchrun worker: load a checkpoint into this layout, with and without the distributed optimizer.

    torchrun --nproc-per-node N tests/workers/reshard_worker.py FULL_PT OUT_DIR <pretrain args>

``FULL_PT`` is the checkpoint converted by stock ``dcp_to_torch_save`` (or any dict of global
tensors by our names): every local parameter and optimizer piece must equal its rectangle of
those global tensors exactly (with ``--finetune``: the parameters only). Then one training step
runs; its loss is written to ``OUT_DIR/loss-<dist>.txt`` by the logging rank.
"""

import os
import sys
import warnings

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from models.cpu_compat import apply_cpu_compat  # noqa: E402
from trainer.arguments import parse_job_config  # noqa: E402
from trainer.checkpointer import Checkpointer  # noqa: E402
from trainer.device import select_device  # noqa: E402
from trainer.metrics_log import MetricsLogger  # noqa: E402
from trainer.training import Trainer, init_distributed, shutdown  # noqa: E402

FP32_PARAM = "optimizer.state.fp32_param."
MOMENTS = "optimizer.state.exp_avg"


def check_state(trainer, state, full) -> int:
    """Compare every loaded piece with the global tensors; returns the number of pieces."""
    for piece in state.load_pieces:
        key = piece.key
        if key not in full and key.startswith(FP32_PARAM):  # weights only: the main weights are the weights
            key = key[len(FP32_PARAM):]
        if key not in full and key.startswith(MOMENTS):  # weights only: Adam's moments start at zero
            expected = torch.zeros(piece.shape)
        else:
            expected = full[key][tuple(slice(o, o + s) for o, s in zip(piece.global_offset, piece.shape))]
        got = piece.view(state.load_arrays)
        if not torch.equal(got.float(), expected.float()):
            raise AssertionError(f"rank {trainer.groups.rank}: {piece.key} at {piece.global_offset} differs")
    return len(state.load_pieces)


def main():
    full_pt, out_dir, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    full = torch.load(full_pt, weights_only=False)
    device = select_device()
    apply_cpu_compat(device.device)
    init_distributed(device)
    groups = parse_job_config(argv).parallel.initialize()
    for distributed in (False, True):
        job = parse_job_config(argv + (["--use-distributed-optimizer"] if distributed else []))
        trainer = Trainer(job, device, groups)
        logger = MetricsLogger(groups.is_logging_rank, job.training.train_iters, None)
        ckpt = Checkpointer(job.checkpoint, trainer, logger)
        trainer.iteration = ckpt.load()
        optimizer_pieces = sum(p.key.startswith("optimizer.") for p in ckpt.state.load_pieces)
        assert optimizer_pieces > 0 or "--finetune" in argv  # a weights-only checkpoint has none
        check_state(trainer, ckpt.state, full)
        loss, _, _ = trainer.train_step()
        if groups.is_logging_rank:
            with open(os.path.join(out_dir, f"loss-{int(distributed)}.txt"), "w") as f:
                f.write(f"{trainer.iteration} {loss!r}\n")
    shutdown()


if __name__ == "__main__":
    main()
