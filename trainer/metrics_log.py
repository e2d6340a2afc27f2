"""Console progress lines and TensorBoard scalars under Megatron-LM's tags."""

from __future__ import annotations

import datetime
import os
import sys
import time


def _eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


class MetricsLogger:
    """Writes on the logging rank only; other ranks get a logger that does nothing."""

    def __init__(self, enabled: bool, train_iters: int, tensorboard_dir: str | None, stream=None):
        self.enabled = enabled
        self.train_iters = train_iters
        self.stream = stream or sys.stdout
        self.writer = None
        self.tensorboard_dir = tensorboard_dir
        self._start = time.monotonic()
        self._start_iteration = 0
        if enabled and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=tensorboard_dir, max_queue=1000)

    def new_branch(self, name: str) -> None:
        """After a live rollback: TensorBoard scalars go to ``<tensorboard dir>/<name>``, a run of
        its own, so the replayed iterations overlay the abandoned ones instead of zig-zagging."""
        if self.writer is None:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer.close()
        self.writer = SummaryWriter(log_dir=os.path.join(self.tensorboard_dir, name), max_queue=1000)

    def info(self, message: str) -> None:
        if self.enabled:
            print(message, file=self.stream, flush=True)

    def start(self, iteration: int) -> None:
        self._start = time.monotonic()
        self._start_iteration = iteration

    def training_step(self, iteration, loss, lr, grad_norm, iteration_time, tokens_per_iteration, consumed_samples):
        """One iteration's metrics: TensorBoard always, the console line at log intervals."""
        if not self.enabled:
            return
        throughput = tokens_per_iteration / iteration_time
        if self.writer is not None:
            self.writer.add_scalar("lm loss", loss, iteration)
            self.writer.add_scalar("learning-rate", lr, iteration)
            self.writer.add_scalar("grad-norm", grad_norm, iteration)
            self.writer.add_scalar("iteration-time", iteration_time, iteration)
            self.writer.add_scalar("throughput", throughput, iteration)

    def console_line(self, iteration, loss, lr, grad_norm, iteration_time, tokens_per_iteration, consumed_samples):
        if not self.enabled:
            return
        if self.writer is not None:
            self.writer.flush()  # a killed job loses at most one log interval of TensorBoard scalars
        done = iteration - self._start_iteration
        elapsed = time.monotonic() - self._start
        remaining = elapsed / max(done, 1) * (self.train_iters - iteration)
        self.info(
            f" iteration {iteration:8d}/{self.train_iters:8d} ({100.0 * iteration / self.train_iters:5.1f}%)"
            f" | consumed samples: {consumed_samples:10d}"
            f" | elapsed time per iteration (ms): {1000 * iteration_time:.1f}"
            f" | tokens/s: {tokens_per_iteration / iteration_time:.0f}"
            f" | learning rate: {lr:.6E} | lm loss: {loss:.6E} | grad norm: {grad_norm:.3f}"
            f" | eta {_eta(remaining)}"
        )

    def validation(self, iteration: int, loss: float) -> None:
        if not self.enabled:
            return
        self.info(f" validation at iteration {iteration} | lm loss: {loss:.6E}")
        if self.writer is not None:
            self.writer.add_scalar("lm loss validation", loss, iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
