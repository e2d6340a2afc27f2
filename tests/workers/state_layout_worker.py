"""torchrun worker: build the trainer, dump every rank's optimizer-state pieces and parameters.

    torchrun --nproc-per-node N tests/workers/state_layout_worker.py OUT_DIR <pretrain args>
"""

import os
import sys
import warnings

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from models.cpu_compat import apply_cpu_compat  # noqa: E402
from trainer.arguments import parse_job_config  # noqa: E402
from trainer.device import select_device  # noqa: E402
from trainer.state_layout import optimizer_state_pieces  # noqa: E402
from trainer.training import Trainer, init_distributed, shutdown  # noqa: E402


def main():
    out_dir, argv = sys.argv[1], sys.argv[2:]
    job = parse_job_config(argv)
    device = select_device()
    apply_cpu_compat(device.device)
    init_distributed(device)
    groups = job.parallel.initialize()
    trainer = Trainer(job, device, groups)
    opt = trainer.optimizer
    pieces = []
    for piece in optimizer_state_pieces(opt, trainer.param_specs, groups.dp_rank):
        local = opt.main_params[piece.start - opt.start : piece.start - opt.start + piece.numel]
        pieces.append({**piece.__dict__, "values": local.view(piece.shape).clone()})
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
