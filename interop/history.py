"""A run's history from its committed checkpoints: per iteration, the global weight norm, the norm
of the change since the previous checkpoint, the mean of Adam's second moment, and the layers
that changed most relative to their size.

Memory holds at most two tensors: the tensors are visited key by key, and for each key the
checkpoints oldest first, keeping only the previous checkpoint's copy of that one tensor to
subtract. So every byte is read once (and its checksum verified), and a 7B run's history needs
the memory of its largest tensor twice, not of the model.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from checkpointing.format import list_checkpoints
from interop.checkpoint_tensors import CheckpointTensors
from trainer.progress import bytes_bar

CHUNK = 1 << 22
"""Elements summed at a time in float64 (bounds the temporary copies of a large tensor)."""
_LAYER = re.compile(r"^(decoder\.layers\.\d+)\.")


def layer_of(key: str) -> str:
    """The group a weight's change is reported under: ``decoder.layers.N``, ``embedding``,
    ``final_layernorm`` or ``output_layer``."""
    match = _LAYER.match(key)
    if match:
        return match.group(1)
    if key.startswith("embedding."):
        return "embedding"
    if key.startswith("decoder.final_layernorm."):
        return "final_layernorm"
    return key.rsplit(".", 1)[0]


def _sum_sq(t: torch.Tensor) -> float:
    flat = t.reshape(-1)
    return sum(float(c.double().square().sum()) for c in flat.split(CHUNK))


def _sum_sq_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return sum(float((x.double() - y.double()).square().sum()) for x, y in zip(a.reshape(-1).split(CHUNK), b.reshape(-1).split(CHUNK)))


def _sum(t: torch.Tensor) -> float:
    return sum(float(c.double().sum()) for c in t.reshape(-1).split(CHUNK))


@dataclass
class HistoryRow:
    """One checkpoint's line of the history."""

    iteration: int
    path: str
    weight_sq: float = 0.0
    update_sq: float | None = None
    """Squared norm of the change from the previous checkpoint; None for the first."""
    v_sum: float = 0.0
    v_count: int = 0
    layer_sq: dict[str, float] = field(default_factory=dict)
    """Per layer group: squared norm of the weights."""
    layer_update_sq: dict[str, float] = field(default_factory=dict)
    """Per layer group: squared norm of the change from the previous checkpoint."""

    @property
    def weight_norm(self) -> float:
        return math.sqrt(self.weight_sq)

    @property
    def update_norm(self) -> float | None:
        return None if self.update_sq is None else math.sqrt(self.update_sq)

    @property
    def adam_v_mean(self) -> float | None:
        """Mean of Adam's second moment over every parameter; None without optimizer state."""
        return self.v_sum / self.v_count if self.v_count else None


def relative_changes(row: HistoryRow, previous: HistoryRow) -> dict[str, float]:
    """Per layer group: |change since ``previous``| / |weights at ``previous``|."""
    return {layer: math.sqrt(sq) / math.sqrt(previous.layer_sq[layer])
            for layer, sq in row.layer_update_sq.items() if previous.layer_sq.get(layer)}


def checkpoint_paths(dirs: list[str], exclude: frozenset[int] = frozenset()) -> list[tuple[int, str]]:
    """(iteration, ``iter_N`` directory) of every committed checkpoint in the level directories
    ``dirs``, oldest first; an iteration held by several is read from the first that has it."""
    found: dict[int, str] = {}
    for root in dirs:
        for c in list_checkpoints(root):
            if c.committed and c.iteration not in exclude:
                found.setdefault(c.iteration, c.path)
    return sorted(found.items())


def checkpoint_history(paths: list[str], verify: bool = True, trust_pickles: bool = False) -> list[HistoryRow]:
    """The history of the checkpoints ``paths`` (``iter_N`` directories, oldest first)."""
    ckpts = [CheckpointTensors(p, verify=verify, trust_pickles=trust_pickles) for p in paths]
    rows = [HistoryRow(c.iteration, c.directory) for c in ckpts]
    for row in rows[1:]:
        row.update_sq = 0.0
    model_keys = sorted({k for c in ckpts for k in c.model_keys()})
    v_keys = sorted({k for c in ckpts for k in c.optimizer_keys("exp_avg_sq")})
    total = sum(c.infos[k].nbytes for c in ckpts for k in (*model_keys, *v_keys) if k in c.infos)
    with bytes_bar(total, "reading checkpoints") as bar:
        for key in model_keys:
            layer = layer_of(key)
            previous: torch.Tensor | None = None
            for ckpt, row in zip(ckpts, rows):
                if key not in ckpt.infos:
                    previous = None
                    continue
                tensor = ckpt.read(key)
                bar.update(ckpt.infos[key].nbytes)
                sq = _sum_sq(tensor)
                row.weight_sq += sq
                row.layer_sq[layer] = row.layer_sq.get(layer, 0.0) + sq
                if previous is not None and previous.shape == tensor.shape and row.update_sq is not None:
                    diff = _sum_sq_diff(tensor, previous)
                    row.update_sq += diff
                    row.layer_update_sq[layer] = row.layer_update_sq.get(layer, 0.0) + diff
                previous = tensor
        for key in v_keys:
            for ckpt, row in zip(ckpts, rows):
                if key in ckpt.infos:
                    tensor = ckpt.read(key)
                    bar.update(ckpt.infos[key].nbytes)
                    row.v_sum += _sum(tensor)
                    row.v_count += tensor.numel()
    return rows


def write_tensorboard(rows: list[HistoryRow], logdir: str) -> None:
    """The history as TensorBoard scalars at step = iteration: ``history/weight-norm``,
    ``history/update-norm``, ``history/adam-v-mean``, ``history/relative-change/<layer>``."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(logdir)
    try:
        for i, row in enumerate(rows):
            writer.add_scalar("history/weight-norm", row.weight_norm, row.iteration)
            if row.update_norm is not None:
                writer.add_scalar("history/update-norm", row.update_norm, row.iteration)
            if row.adam_v_mean is not None:
                writer.add_scalar("history/adam-v-mean", row.adam_v_mean, row.iteration)
            if i:
                for layer, value in sorted(relative_changes(row, rows[i - 1]).items()):
                    writer.add_scalar(f"history/relative-change/{layer}", value, row.iteration)
    finally:
        writer.close()


def format_history(rows: list[HistoryRow], top: int = 3) -> list[str]:
    """The history as a table, one line per checkpoint."""
    lines = [f"{'iteration':>9}  {'weight norm':>12}  {'update norm':>12}  {'Adam v mean':>12}  "
             f"top {top} layers by relative change"]
    for i, row in enumerate(rows):
        update = f"{row.update_norm:12.6g}" if row.update_norm is not None else f"{'-':>12}"
        v = f"{row.adam_v_mean:12.4e}" if row.adam_v_mean is not None else f"{'-':>12}"
        ranked = sorted(relative_changes(row, rows[i - 1]).items(), key=lambda kv: -kv[1])[:top] if i else []
        layers = ", ".join(f"{layer} {value:.3e}" for layer, value in ranked) or "-"
        lines.append(f"{row.iteration:>9}  {row.weight_norm:12.6g}  {update}  {v}  {layers}")
    return lines
