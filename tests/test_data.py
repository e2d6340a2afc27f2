"""Sample order is a pure function of seed and index; DP ranks split the global batch."""

import torch

from tokenization.tokenizer import ByteTokenizer
from trainer.data import BatchSource, DataConfig, IndexedGPTDataset, MockGPTDataset
from trainer.prepare import build_indexed_dataset, iter_documents


def mock_config(**kw):
    values = dict(seq_length=16, micro_batch_size=2, global_batch_size=8, mock_data=True)
    values.update(kw)
    return DataConfig(**values)


def test_mock_samples_are_a_pure_function_of_seed_and_index():
    a, b = MockGPTDataset(16, 100, seed=3, split="train"), MockGPTDataset(16, 100, seed=3, split="train")
    assert torch.equal(a.sample(12345), b.sample(12345))
    assert not torch.equal(a.sample(1), a.sample(2))
    assert not torch.equal(a.sample(1), MockGPTDataset(16, 100, seed=4, split="train").sample(1))
    assert not torch.equal(a.sample(1), MockGPTDataset(16, 100, seed=3, split="valid").sample(1))


def test_data_parallel_ranks_split_the_single_process_batch():
    cfg = mock_config()
    ds = MockGPTDataset(16, 100, seed=3, split="train")
    single = BatchSource(ds, cfg, 0, 1, torch.device("cpu"))
    ranks = [BatchSource(ds, cfg, r, 2, torch.device("cpu")) for r in range(2)]
    for iteration in (0, 7):
        whole = torch.cat([b.tokens for b in single.microbatches(iteration)])
        split = torch.cat([b.tokens for r in ranks for b in r.microbatches(iteration)])
        assert torch.equal(whole, split)
    assert single.num_microbatches == 4 and ranks[0].num_microbatches == 2
    batch = next(single.microbatches(0))
    assert torch.equal(batch.labels[:, :-1], batch.tokens[:, 1:])


def test_indexed_dataset_round_trip(tmp_path):
    text = "".join(f"line {i}: to be or not to be\n" for i in range(200))
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "b.jsonl").write_text('{"text": "hello"}\n{"text": "world"}\n')
    prefix = str(tmp_path / "corpus")
    counts = build_indexed_dataset(iter_documents([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")]), ByteTokenizer(), prefix)
    assert counts["documents"] == 3
    ds = IndexedGPTDataset(prefix, seq_length=32, seed=1, split="train", weights=(1.0, 0.0, 0.0))
    stream = bytes(text, "utf-8")
    seen = set()
    for i in range(ds.num_samples):
        sample = ds.sample(i)
        assert sample.shape == (33,)
        chunk = bytes(sample.tolist()[:10]) if max(sample.tolist()[:10]) < 256 else None
        if chunk is not None:
            assert chunk in stream
        seen.add(tuple(sample.tolist()))
    assert len(seen) == ds.num_samples, "one epoch visits every sample once"
    again = IndexedGPTDataset(prefix, seq_length=32, seed=1, split="train", weights=(1.0, 0.0, 0.0))
    assert torch.equal(again.sample(ds.num_samples + 5), ds.sample(ds.num_samples + 5))
