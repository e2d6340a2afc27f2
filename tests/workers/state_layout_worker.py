"""torchrun worker: build the trainer, dump every rank's optimizer-state pieces and parameters.

    torchrun --nproc-per-node N tests/workers/state_layout_worker.py OUT_DIR <pretrain args>
"""

import os
import sys
import warnings

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from tests.workers.trainer_setup import start_trainer  # noqa: E402
from trainer.optimizer_pieces import optimizer_state_pieces  # noqa: E402
from trainer.training import shutdown  # noqa: E402


def main():
    out_dir, argv = sys.argv[1], sys.argv[2:]
    _, trainer = start_trainer(argv)
    groups = trainer.groups
    opt = trainer.optimizer
    pieces = []
    for piece in optimizer_state_pieces(opt, trainer.param_specs, groups.dp_rank):
        pieces.append({"global_name": piece.key, "global_shape": piece.global_shape, "global_offset": piece.global_offset,
                       "is_writer": piece.is_writer,
                       "values": piece.view({"fp32_param": opt.main_params}).clone()})
    params = []
    for name, p in trainer.model.named_parameters():
        spec = trainer.param_specs[name]
        params.append({"global_name": spec.global_name, "global_shape": spec.global_shape,
                       "global_offset": spec.global_offset, "is_main": spec.is_main_replica,
                       "values": p.detach().float().clone()})
    torch.save({"pieces": pieces, "params": params, "num_shards": len(opt.shards)},
               os.path.join(out_dir, f"rank{groups.rank}.pt"))
    shutdown()


if __name__ == "__main__":
    main()
