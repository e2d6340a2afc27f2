"""One process: load a checkpoint the way training does, then report what the model computes.

    python tests/workers/gpt_logits_worker.py OUT_PT PROMPT NEW_TOKENS <pretrain args with --load>

``PROMPT`` is comma-separated token ids. Writes to ``OUT_PT``: the logits of the prompt (true
vocabulary columns, fp32), ``NEW_TOKENS`` greedily generated ids (argmax of the last position,
appended, repeated; no cache) and the loss of one training step on the run's first batch (the
loss of the loaded weights: it is computed before the update).
"""

import os
import sys
import warnings

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from tests.workers.trainer_setup import start_trainer  # noqa: E402
from trainer.checkpointer import Checkpointer  # noqa: E402
from trainer.metrics_log import MetricsLogger  # noqa: E402
from trainer.pipeline_schedule import causal_attention_mask  # noqa: E402
from trainer.training import shutdown  # noqa: E402


@torch.no_grad()
def logits_of(model, ids: list[int], vocab: int) -> torch.Tensor:
    tokens = torch.tensor([ids])
    positions = torch.arange(len(ids))[None]
    return model(tokens, positions, causal_attention_mask(len(ids), tokens.device))[0, :, :vocab].float()


def main():
    out_pt, prompt, new_tokens, argv = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    job, trainer = start_trainer(argv)
    logger = MetricsLogger(True, job.training.train_iters, None)
    trainer.iteration = Checkpointer(job.checkpoint, trainer, logger).load()
    vocab = job.model.vocab_size
    ids = [int(i) for i in prompt.split(",")]
    trainer.model.eval()
    logits = logits_of(trainer.model, ids, vocab)
    generated = list(ids)
    for _ in range(new_tokens):
        generated.append(int(logits_of(trainer.model, generated, vocab)[-1].argmax()))
    loss, _, _ = trainer.train_step()
    torch.save({"logits": logits, "generated": generated[len(ids):], "loss": loss}, out_pt)
    shutdown()


if __name__ == "__main__":
    main()
