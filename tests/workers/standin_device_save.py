"""torchrun worker: train, then save a checkpoint that says it was written on another device.

    python tests/workers/standin_device_save.py DEVICE_TYPE <pretrain args, with --save>

Training runs on the CPU; only what the checkpoint records about the device is a stand-in
(``DEVICE_TYPE``, e.g. ``cuda``, with a CUDA-sized generator state), so that a CPU test can load
a checkpoint "from a GPU" and check what the load restores and what it says.
"""

import os
import sys
import types
import warnings

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from tests.workers.trainer_setup import start_trainer  # noqa: E402
from trainer.checkpointer import Checkpointer  # noqa: E402
from trainer.metrics_log import MetricsLogger  # noqa: E402
from trainer.training import shutdown  # noqa: E402


def main():
    device_type, argv = sys.argv[1], sys.argv[2:]
    job, trainer = start_trainer(argv)
    logger = MetricsLogger(trainer.groups.is_logging_rank, job.training.train_iters, None)
    ckpt = Checkpointer(job.checkpoint, trainer, logger)
    while trainer.iteration < job.training.train_iters:
        trainer.train_step()
    # The stand-in: a device of another type whose generator state has a CUDA generator's size.
    trainer.device_ctx = types.SimpleNamespace(device=torch.device(device_type), synchronize=lambda: None,
                                               get_rng_state=lambda: torch.zeros(16, dtype=torch.uint8))
    ckpt.manager.save_sync(trainer.iteration)
    shutdown()


if __name__ == "__main__":
    main()
