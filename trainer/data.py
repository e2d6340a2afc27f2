"""Training data: deterministic mock tokens, or a megatron-core indexed dataset (.bin/.idx).

The order of samples is a pure function of the seed and the global sample index, so a run can
resume at any iteration: iteration ``it`` (0-based) of a global batch ``G`` reads global samples
``[it * G, (it + 1) * G)``; data-parallel rank ``d`` takes the ``d``-th contiguous part of it,
cut into micro-batches.

A blend (``--data-path 0.3 A 0.7 B``, Megatron-LM's weighted prefixes) keeps that property: which
prefix global sample ``i`` comes from is a pure function of ``i`` (:class:`BlendedDataset`), and
each prefix is read in its own seeded order.
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


def parse_data_path(values) -> tuple[tuple[float, str], ...]:
    """``--data-path``'s words as (normalised weight, prefix) pairs: one prefix (weight 1), or
    Megatron-LM's ``W1 P1 W2 P2 ...``."""
    values = list(values)
    if len(values) == 1:
        return ((1.0, values[0]),)
    if not values:
        return ()
    try:
        weights = [float(w) for w in values[0::2]]
    except ValueError:
        weights = []
    if len(values) % 2 or not weights or min(weights) <= 0:
        raise ValueError(f"--data-path {' '.join(values)}: give one PREFIX, or WEIGHT PREFIX pairs with positive "
                         "weights (e.g. --data-path 0.3 data/a 0.7 data/b)")
    total = sum(weights)
    return tuple((w / total, p) for w, p in zip(weights, values[1::2]))


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
    data_path: tuple[str, ...] | None = flag("--data-path", None, nargs="+", parse=str, metavar="[WEIGHT] PREFIX")
    """Prefix of an indexed dataset, ``PREFIX.bin`` and ``PREFIX.idx`` (``scripts/prepare_data.py``
    makes them), or a blend as Megatron-LM takes it: ``W1 PREFIX1 W2 PREFIX2 ...`` (the weights are
    normalised)."""
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
            if isinstance(self.data_path, str):
                object.__setattr__(self, "data_path", (self.data_path,))
            object.__setattr__(self, "data_path", tuple(self.data_path))
            for _, prefix in self.blend:
                for suffix in (".bin", ".idx"):
                    if not os.path.isfile(prefix + suffix):
                        raise ValueError(
                            f"--data-path {prefix}: {prefix + suffix} does not exist; make it with scripts/prepare_data.py"
                        )

    @property
    def blend(self) -> tuple[tuple[float, str], ...]:
        """(normalised weight, prefix) of each dataset of ``--data-path``."""
        return parse_data_path(self.data_path or ())


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


class DataError(ValueError):
    """The data cannot feed this run's model (a token id past its vocabulary): which prefix, which
    sample, and what to do."""


def prefixes_without_record(cfg: DataConfig) -> list[str]:
    """The ``--data-path`` prefixes prepared before the tokenizer was recorded beside the data
    (``tokenization.data_record``): they train with the tokenizer the flags name, unchecked."""
    from tokenization.data_record import read_record

    return [] if cfg.mock_data else [prefix for _, prefix in cfg.blend if read_record(prefix) is None]


class IndexedGPTDataset:
    """Samples of ``seq_length + 1`` consecutive tokens of a megatron-core indexed dataset.

    Documents are stored back to back, each ended by the tokenizer's EOD, so the ``.bin`` file is
    one token stream; sample ``k`` of the split starts at token ``k * seq_length``. Samples are
    visited in a seeded permutation per epoch.
    """

    def __init__(self, prefix: str, seq_length: int, seed: int, split: str, weights, salt: int | None = None,
                 vocab_size: int | None = None):
        """``salt``: in a blend, the prefix's place in it (each prefix then has an order of its own).
        ``vocab_size``: every sample is checked to hold only ids below it (data prepared with
        another tokenizer would otherwise fail deep in the embedding)."""
        self.prefix = prefix
        self.vocab_size = vocab_size
        from models.megatron_import import import_megatron_core

        import_megatron_core()  # megatron-core's import-time torch.compile deferred: ~3 CPU-s less
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
        self.salt = salt
        self._epoch = -1
        self._order: np.ndarray | None = None

    def sample(self, index: int) -> torch.Tensor:
        epoch, position = divmod(index, self.num_samples)
        if epoch != self._epoch:
            parts = (self.seed, "order", self.split, epoch) + (() if self.salt is None else (self.salt,))
            g = torch.Generator().manual_seed(_seed_of(*parts))
            self._order = torch.randperm(self.num_samples, generator=g).numpy()
            self._epoch = epoch
        start = (self.first + int(self._order[position])) * self.seq_length
        sample = torch.from_numpy(self.tokens[start : start + self.seq_length + 1].astype(np.int64))
        if self.vocab_size is not None and int(sample.max()) >= self.vocab_size:
            raise DataError(f"--data-path {self.prefix}: token id {int(sample.max())} (in tokens {start}-"
                            f"{start + self.seq_length} of its .bin) is past this run's vocabulary of {self.vocab_size}: "
                            "the data was prepared with another tokenizer; train with that one (--tokenizer-type and "
                            "its files), or prepare the data again")
        return sample


class BlendedDataset:
    """Megatron-LM's data blend: global sample ``i`` comes from dataset ``j`` with probability
    ``weights[j]``, as a pure function of ``i``.

    Sample ``i`` goes to the dataset whose cumulative-weight interval holds ``frac(i * phi)``, phi
    the golden ratio's conjugate: a low-discrepancy sequence, so any run of n samples holds
    ``weights[j] * n`` of dataset ``j`` within a few samples, with no random state to carry. Its
    position in dataset ``j`` is the count of earlier samples sent there, computed per block of
    :data:`BLOCK` indices (vectorised) and cached, so a resume at any iteration costs one pass
    over the blocks before it.
    """

    BLOCK = 1 << 16
    PHI = (5 ** 0.5 - 1) / 2

    def __init__(self, datasets: list, weights: list[float]):
        self.datasets = datasets
        self.edges = np.cumsum(np.asarray(weights, dtype=np.float64) / sum(weights))[:-1]
        self._starts: list[np.ndarray] = [np.zeros(len(datasets), dtype=np.int64)]
        """Per block, each dataset's count of the samples of all earlier blocks."""
        self._block: tuple[int, np.ndarray, np.ndarray] | None = None
        """(block number, dataset of each index in it, position of each index in its dataset)."""

    def _choices(self, first: int, count: int) -> np.ndarray:
        index = np.arange(first, first + count, dtype=np.float64)
        return np.searchsorted(self.edges, np.mod(index * self.PHI, 1.0), side="right")

    def locate(self, index: int) -> tuple[int, int]:
        """(dataset, position in it) of global sample ``index``."""
        block, offset = divmod(index, self.BLOCK)
        if self._block is None or self._block[0] != block:
            while len(self._starts) <= block:
                done = len(self._starts) - 1
                counts = np.bincount(self._choices(done * self.BLOCK, self.BLOCK), minlength=len(self.datasets))
                self._starts.append(self._starts[-1] + counts)
            choices = self._choices(block * self.BLOCK, self.BLOCK)
            positions = np.empty(self.BLOCK, dtype=np.int64)
            for j in range(len(self.datasets)):
                mine = choices == j
                positions[mine] = self._starts[block][j] + np.arange(int(mine.sum()))
            self._block = (block, choices, positions)
        _, choices, positions = self._block
        return int(choices[offset]), int(positions[offset])

    def sample(self, index: int) -> torch.Tensor:
        dataset, position = self.locate(index)
        return self.datasets[dataset].sample(position)


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
    blend = cfg.blend
    if len(blend) == 1:
        return IndexedGPTDataset(blend[0][1], cfg.seq_length, seed, split, cfg.split, vocab_size=vocab_size)
    # --split applies to each prefix; each has an order of its own.
    return BlendedDataset([IndexedGPTDataset(prefix, cfg.seq_length, seed, split, cfg.split, salt=j,
                                             vocab_size=vocab_size)
                           for j, (_, prefix) in enumerate(blend)], [w for w, _ in blend])
