"""Training data: deterministic mock tokens, or a megatron-core indexed dataset (.bin/.idx).

The order of samples is a pure function of the seed and the global sample index, so a run can
resume at any iteration: iteration ``it`` (0-based) of a global batch ``G`` reads global samples
``[it * G, (it + 1) * G)``; data-parallel rank ``d`` takes the ``d``-th contiguous part of it,
cut into micro-batches.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from cli.flags import flag


def parse_split(text: str) -> tuple[float, float, float]:
    """``--split 969,30,1`` (or ``969/30/1``) as three weights."""
    try:
        parts = tuple(float(x) for x in text.replace("/", ",").split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3:
        raise ValueError(f"--split {text!r}: expected three numbers such as 969,30,1")
    return parts  # type: ignore[return-value]


@dataclass(frozen=True)
class DataConfig:
    """Where samples come from and how they are batched."""

    seq_length: int
    """Tokens per sample: the model's ``--seq-length``."""
    global_batch_size: int = flag("--global-batch-size", derived="--micro-batch-size x data-parallel size")
    """Samples per iteration over all data-parallel ranks."""
    micro_batch_size: int = flag("--micro-batch-size", 1)
    """Samples per micro-batch on one rank."""
    mock_data: bool = flag("--mock-data", False)
    """Deterministic synthetic, learnable token sequences."""
    data_path: str | None = flag("--data-path", None)
    """Prefix of an indexed dataset, ``PREFIX.bin`` and ``PREFIX.idx`` (``scripts/prepare_data.py``
    makes them)."""
    split: tuple[float, float, float] = flag("--split", (969.0, 30.0, 1.0), parse=parse_split, metavar="TRAIN,VALID,TEST")
    """Train, validation and test weights of ``--data-path``'s samples."""

    def __post_init__(self) -> None:
        if self.mock_data == (self.data_path is not None):
            raise ValueError("pass exactly one of --mock-data and --data-path PREFIX")
        for name in ("seq_length", "micro_batch_size", "global_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if len(self.split) != 3 or min(self.split) < 0 or sum(self.split) <= 0:
            raise ValueError(f"--split needs three non-negative weights, got {self.split}")
        if self.data_path is not None:
            for suffix in (".bin", ".idx"):
                if not os.path.isfile(self.data_path + suffix):
                    raise ValueError(
                        f"--data-path {self.data_path}: {self.data_path + suffix} does not exist; "
                        "make it with scripts/prepare_data.py"
                    )


def _seed_of(*parts) -> int:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class MockGPTDataset:
    """Arithmetic token sequences ``(a + k*b) mod V`` with per-sample random ``a`` and ``b``.

    Learnable (a model that has seen two tokens can predict the rest), so the demo's loss falls,
    and each sample is a pure function of (seed, split, index).
    """

    def __init__(self, seq_length: int, vocab_size: int, seed: int, split: str):
        self.seq_length = seq_length
        self.vocab_size = vocab_size
        self.seed = seed
        self.split = split

    def sample(self, index: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(_seed_of(self.seed, "mock", self.split, index))
        start = torch.randint(0, self.vocab_size, (1,), generator=g)
        step = torch.randint(1, 8, (1,), generator=g)
        return (start + step * torch.arange(self.seq_length + 1)) % self.vocab_size


class IndexedGPTDataset:
    """Samples of ``seq_length + 1`` consecutive tokens of a megatron-core indexed dataset.

    Documents are stored back to back, each ended by the tokenizer's EOD, so the ``.bin`` file is
    one token stream; sample ``k`` of the split starts at token ``k * seq_length``. Samples are
    visited in a seeded permutation per epoch.
    """

    def __init__(self, prefix: str, seq_length: int, seed: int, split: str, weights):
        from megatron.core.datasets.indexed_dataset import IndexedDataset, get_bin_path

        index = IndexedDataset(prefix)
        self.tokens = np.memmap(get_bin_path(prefix), dtype=index.index.dtype, mode="r")
        self.seq_length = seq_length
        total = (len(self.tokens) - 1) // seq_length
        if total < 1:
            raise ValueError(f"{prefix}: {len(self.tokens)} tokens is less than one sample of {seq_length + 1}")
        bounds = np.cumsum([0.0, *weights]) / sum(weights) * total
        part = {"train": 0, "valid": 1, "test": 2}[split]
        self.first = int(round(bounds[part]))
        self.num_samples = int(round(bounds[part + 1])) - self.first
        if self.num_samples < 1:
            raise ValueError(f"{prefix}: the {split} split of --split {tuple(weights)} holds no sample")
        self.seed = seed
        self.split = split
        self._epoch = -1
        self._order: np.ndarray | None = None

    def sample(self, index: int) -> torch.Tensor:
        epoch, position = divmod(index, self.num_samples)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(_seed_of(self.seed, "order", self.split, epoch))
            self._order = torch.randperm(self.num_samples, generator=g).numpy()
            self._epoch = epoch
        start = (self.first + int(self._order[position])) * self.seq_length
        return torch.from_numpy(self.tokens[start : start + self.seq_length + 1].astype(np.int64))


@dataclass
class Batch:
    """One micro-batch, laid out as megatron-core's GPTModel wants it."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor


class BatchSource:
    """Micro-batches of one data-parallel rank for any iteration."""

    def __init__(self, dataset, cfg: DataConfig, dp_rank: int, dp_size: int, device: torch.device):
        if cfg.global_batch_size % (cfg.micro_batch_size * dp_size):
            raise ValueError(
                f"--global-batch-size {cfg.global_batch_size} is not divisible by "
                f"--micro-batch-size {cfg.micro_batch_size} x data-parallel size {dp_size}"
            )
        self.dataset = dataset
        self.cfg = cfg
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.device = device
        self.num_microbatches = cfg.global_batch_size // (cfg.micro_batch_size * dp_size)
        self._positions = torch.arange(cfg.seq_length, device=device).unsqueeze(0)

    def microbatches(self, iteration: int) -> Iterator[Batch]:
        """Micro-batches of 0-based ``iteration`` for this rank."""
        cfg = self.cfg
        per_rank = cfg.global_batch_size // self.dp_size
        first = iteration * cfg.global_batch_size + self.dp_rank * per_rank
        for m in range(self.num_microbatches):
            start = first + m * cfg.micro_batch_size
            samples = torch.stack([self.dataset.sample(i) for i in range(start, start + cfg.micro_batch_size)])
            if self.device.type != "cpu":
                # From pageable memory a "non-blocking" host-to-device copy is synchronous; from
                # pinned memory it overlaps the previous micro-batch's compute.
                samples = samples.pin_memory()
            samples = samples.to(self.device, non_blocking=True)
            yield Batch(
                tokens=samples[:, :-1].contiguous(),
                labels=samples[:, 1:].contiguous(),
                loss_mask=torch.ones(samples.shape[0], cfg.seq_length, device=self.device),
                position_ids=self._positions.expand(samples.shape[0], -1),
            )


def build_dataset(cfg: DataConfig, split: str, vocab_size: int, seed: int):
    """The ``split`` ("train", "valid") of the configured data; ``seed`` (``--seed``) orders it."""
    if cfg.mock_data:
        return MockGPTDataset(cfg.seq_length, vocab_size, seed, split)
    return IndexedGPTDataset(cfg.data_path, cfg.seq_length, seed, split, cfg.split)
