"""Console progress lines and TensorBoard scalars under Megatron-LM's tags.

The console line is Megatron-LM's: loss and time per iteration are the means over the
iterations since the previous line (``--log-interval``), with the count of iterations whose
update was skipped (a non-finite gradient norm); TensorBoard gets every iteration's own values.
Validation prints the loss and its perplexity."""

from __future__ import annotations

import datetime
import math
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
        self._interval: list[tuple[float, float, bool]] = []
        """(loss, iteration time, finite gradient norm) of each iteration since the last console line."""
        if enabled and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=tensorboard_dir, max_queue=1000)

    def new_branch(self, name: str) -> None:
        """After a live rollback: TensorBoard scalars go to ``<tensorboard dir>/<name>``, a run of
        its own, so the replayed iterations overlay the abandoned ones instead of zig-zagging."""
        self._interval = []  # the console's averages start again with the branch
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
        """One iteration's metrics: TensorBoard always; the console line (:meth:`console_line`)
        averages them over the iterations since the last line, as Megatron-LM's does."""
        if not self.enabled:
            return
        self._interval.append((loss, iteration_time, math.isfinite(grad_norm)))
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
        interval = self._interval or [(loss, iteration_time, math.isfinite(grad_norm))]
        self._interval = []
        losses = [value for value, _, _ in interval if math.isfinite(value)]
        mean_loss = sum(losses) / len(losses) if losses else float("nan")
        mean_time = sum(t for _, t, _ in interval) / len(interval)
        skipped = sum(1 for _, _, finite in interval if not finite)
        self.info(
            f" iteration {iteration:8d}/{self.train_iters:8d} ({100.0 * iteration / self.train_iters:5.1f}%)"
            f" | consumed samples: {consumed_samples:10d}"
            f" | elapsed time per iteration (ms): {1000 * mean_time:.1f}"
            f" | tokens/s: {tokens_per_iteration / mean_time:.0f}"
            f" | learning rate: {lr:.6E} | lm loss: {mean_loss:.6E} | grad norm: {grad_norm:.3f}"
            f" | number of skipped iterations: {skipped:3d}"
            f" | eta {_eta(remaining)}"
        )

    def validation(self, iteration: int, loss: float) -> None:
        if not self.enabled:
            return
        ppl = math.exp(min(20.0, loss)) if math.isfinite(loss) else float("nan")  # Megatron-LM caps it likewise
        self.info(f" validation loss at iteration {iteration} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E}")
        if self.writer is not None:
            self.writer.add_scalar("lm loss validation", loss, iteration)
            self.writer.add_scalar("lm loss validation ppl", ppl, iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
