"""Megatron-LM's data blends (``--data-path 0.3 A 0.7 B``): drawn in proportion, a pure function
of the global sample index (so a resume reads what the uninterrupted run read)."""

import pytest
import torch

from tokenization.tokenizer import ByteTokenizer
from trainer.arguments import ArgumentError, parse_job_config
from trainer.data import BlendedDataset, DataConfig, build_dataset, parse_data_path
from trainer.prepare import build_indexed_dataset


class Tagged:
    """A dataset whose sample says where it came from."""

    def __init__(self, tag):
        self.tag = tag

    def sample(self, position):
        return torch.tensor([self.tag, position])


def test_a_blend_is_drawn_in_proportion_and_each_dataset_in_order():
    blend = BlendedDataset([Tagged(0), Tagged(1), Tagged(2)], [3, 7, 10])
    n = 200_000
    drawn = [blend.locate(i) for i in range(n)]
    for j, weight in enumerate((0.15, 0.35, 0.5)):
        positions = [p for d, p in drawn if d == j]
        assert abs(len(positions) / n - weight) < 1e-3, (j, len(positions) / n)
        assert positions == list(range(len(positions)))  # each dataset read in its own order, none skipped


def test_a_blend_is_a_pure_function_of_the_index():
    first = BlendedDataset([Tagged(0), Tagged(1)], [0.3, 0.7])
    wanted = [first.locate(i) for i in range(150_000)]
    resumed = BlendedDataset([Tagged(0), Tagged(1)], [0.3, 0.7])  # a resume: a fresh object, late indices first
    for i in (149_999, 70_000, 3, 131_072, 65_535, 65_536):
        assert resumed.locate(i) == wanted[i], i


@pytest.mark.parametrize("words, message", [(["data/a", "0.5"], "WEIGHT PREFIX pairs"),
                                            (["0", "data/a", "1", "data/b"], "positive"),
                                            (["a", "b"], "WEIGHT PREFIX pairs")])
def test_a_malformed_blend_is_refused(words, message):
    with pytest.raises(ValueError, match=message):
        parse_data_path(words)


def test_the_trainer_reads_a_blend_of_two_prefixes(tmp_path):
    for name, text in (("a", "aaaa " * 400), ("b", "bbbb " * 400)):
        build_indexed_dataset(iter([text, text]), ByteTokenizer(), str(tmp_path / name))
    job = parse_job_config(["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
                            "--seq-length", "16", "--micro-batch-size", "1", "--lr", "1e-3", "--train-iters", "1",
                            "--data-path", "1", str(tmp_path / "a"), "3", str(tmp_path / "b")])
    assert [round(w, 2) for w, _ in job.data.blend] == [0.25, 0.75]
    dataset = build_dataset(job.data, "train", job.model.vocab_size, 1234)
    from_b = [ord("b") in dataset.sample(i).tolist() for i in range(400)]
    assert abs(sum(from_b) / 400 - 0.75) < 0.02
    with pytest.raises(ArgumentError, match="does not exist"):
        parse_job_config(["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length",
                          "16", "--lr", "1e-3", "--train-iters", "1", "--data-path", "1", str(tmp_path / "a"), "1",
                          str(tmp_path / "missing")])
    assert DataConfig(seq_length=16, global_batch_size=1, data_path=str(tmp_path / "a")).blend == \
        ((1.0, str(tmp_path / "a")),)
