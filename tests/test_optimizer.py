"""The flat buffers and ZeRO-1 Adam: geometry of ranges and shards, and the update itself."""

import dataclasses
import math

import pytest
import torch

import trainer.optimizer as optimizer_module
from trainer.flat_buffers import FlatParamsAndGrads
from trainer.optimizer import DistributedAdam, OptimizerConfig, cut_blocks, cut_shards, partition_rows


def small_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.LayerNorm(13), torch.nn.Linear(13, 5))


def row_boundaries(buffers):
    bounds = set()
    for span in buffers.spans:
        bounds.update(range(span.start, span.end + 1, span.row_numel))
    return bounds


def test_parameters_become_views_of_the_flat_buffer():
    model = small_model()
    before = [p.detach().clone() for p in model.parameters()]
    buffers = FlatParamsAndGrads(model)
    for p, old in zip(model.parameters(), before):
        assert torch.equal(p, old)
        assert p.untyped_storage().data_ptr() == buffers.params.untyped_storage().data_ptr()
    model(torch.randn(3, 7)).sum().backward()
    assert all(p.grad is None for p in model.parameters()), "grads go to the flat fp32 buffer"
    assert buffers.grads.abs().sum() > 0


@pytest.mark.parametrize("parts", [1, 2, 3, 8])
def test_dp_ranges_cover_the_buffer_and_end_on_rows(parts):
    buffers = FlatParamsAndGrads(small_model())
    ranges = partition_rows(buffers, 0, buffers.numel, parts)
    assert len(ranges) == parts and ranges[0][0] == 0 and ranges[-1][1] == buffers.numel
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    rows = row_boundaries(buffers)
    assert all(lo in rows and hi in rows for lo, hi in ranges)
    sizes = [hi - lo for lo, hi in ranges]
    assert max(sizes) - min(sizes) <= 2 * max(s.row_numel for s in buffers.spans)


def test_shards_end_on_rows_and_respect_the_size_unless_one_row_is_larger():
    buffers = FlatParamsAndGrads(small_model())
    shards = cut_shards(buffers, 0, buffers.numel, shard_numel=20)
    rows = row_boundaries(buffers)
    assert shards[0][0] == 0 and shards[-1][1] == buffers.numel
    for lo, hi in shards:
        assert lo in rows and hi in rows and hi > lo
        single_row = buffers.row_boundary(lo + 1, round_up=True) == hi
        assert hi - lo <= 20 or single_row


def test_matches_torch_adamw_with_weight_decay_on_matrices_only(single_process_group):
    cfg = OptimizerConfig(weight_decay=0.1, clip_grad=0.0, shard_size_mb=40 / 2**20)  # 10-element shards
    ours_model, ref_model = small_model(1), small_model(1)
    buffers = FlatParamsAndGrads(ours_model)
    ours = DistributedAdam(buffers, cfg, single_process_group, 1, single_process_group)
    assert len(ours.shards) > 5
    decay = [p for p in ref_model.parameters() if p.dim() >= 2]
    no_decay = [p for p in ref_model.parameters() if p.dim() < 2]
    ref = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    for step in range(5):
        x = torch.randn(4, 7, generator=torch.Generator().manual_seed(step))
        buffers.zero_grads()
        ours_model(x).pow(2).sum().backward()
        ours.step(1e-2)
        ref.zero_grad()
        ref_model(x).pow(2).sum().backward()
        ref.step()
    for a, b in zip(ours_model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_clipping_scales_to_the_global_norm(single_process_group):
    model = torch.nn.Linear(4, 4, bias=False)
    buffers = FlatParamsAndGrads(model)
    cfg = OptimizerConfig(weight_decay=0.0, clip_grad=1.0, adam_beta1=0.0, adam_beta2=0.0)
    opt = DistributedAdam(buffers, cfg, single_process_group, 1, single_process_group)
    buffers.grads.fill_(3.0)  # norm = 3 * sqrt(16) = 12
    before = buffers.params.clone()
    norm = opt.step(lr=0.5)
    assert norm == pytest.approx(12.0)
    # With beta1 = beta2 = 0 Adam's step is lr * g / (|g| + eps): sign-like, independent of scale,
    # so check the clipped gradient through the second moment instead.
    assert opt.exp_avg_sq[0].item() == pytest.approx((3.0 / 12.0) ** 2, rel=1e-4)
    assert torch.allclose(buffers.params, before - 0.5, atol=1e-5)


def test_tp_replicated_parameters_count_once_in_the_norm(single_process_group):
    model = torch.nn.Linear(2, 2)
    buffers = FlatParamsAndGrads(model, tp_rank=1, tp_split=frozenset({"weight"}))
    opt = DistributedAdam(buffers, OptimizerConfig(), single_process_group, 1, single_process_group)
    buffers.grads.fill_(1.0)  # weight (4 elements) counts on TP rank 1; the replicated bias does not
    assert opt.grad_norm() == pytest.approx(math.sqrt(4))


def test_non_finite_gradient_norm_skips_the_update(single_process_group):
    model = torch.nn.Linear(3, 3)
    buffers = FlatParamsAndGrads(model)
    opt = DistributedAdam(buffers, OptimizerConfig(), single_process_group, 1, single_process_group)
    before = buffers.params.clone()
    buffers.grads.fill_(1.0)
    buffers.grads[2] = float("nan")
    assert math.isnan(opt.step(lr=0.1))
    assert torch.equal(buffers.params, before) and torch.equal(opt.main_params, before)
    assert opt.exp_avg.abs().sum() == 0 and opt.step_count == 0 and opt.skipped_steps == 1


class _PingPong:
    """A version store with two sets of arrays, as the engine's zero-copy pool hands them out."""

    def __init__(self, numel):
        self.sets = [{k: torch.full((numel,), float("nan")) for k in ("fp32_param", "exp_avg", "exp_avg_sq")}
                     for _ in range(2)]
        self.next = 0
        self.commits = 0

    def begin(self):
        out = self.sets[self.next]
        self.next ^= 1
        return out

    def commit(self):
        self.commits += 1


def _step_all(models, buffers, opts, step, device="cpu"):
    """One identical training step of every (model, buffers, optimizer) triple."""
    x = torch.randn(4, 7, generator=torch.Generator().manual_seed(step)).to(device)
    for model, b, opt in zip(models, buffers, opts):
        b.zero_grads()
        model(x).pow(2).sum().backward()
        opt.step(1e-2)


def test_blocks_cover_the_shard_in_order_and_split_where_weight_decay_changes():
    decay = ((0, 10), (14, 30))
    blocks = cut_blocks(decay, 33, 8)
    pieces = [p for block in blocks for p in block]
    assert [(a, b) for a, b, _ in pieces] == [(0, 8), (8, 10), (10, 14), (14, 16), (16, 24), (24, 30), (30, 32), (32, 33)]
    assert [d for _, _, d in pieces] == [True, True, False, True, True, True, False, False]
    assert all(sum(b - a for a, b, _ in block) <= 8 for block in blocks)
    assert cut_blocks((), 5, 8) == (((0, 5, False),),)


@pytest.mark.parametrize("clip", [0.0, 0.01])
@pytest.mark.parametrize("block_numel", [1 << 20, 7])
def test_an_out_of_place_step_gives_the_in_place_bits(single_process_group, clip, block_numel, monkeypatch):
    """Zero-copy snapshots write each version into another set of arrays; the arithmetic and so
    every bit of weights and moments must not change (weight decay on some ranges, clipping;
    blocks of 7 elements: many blocks per shard, cut inside parameters and decay ranges)."""
    monkeypatch.setattr(optimizer_module, "_HOST_BLOCK_NUMEL", block_numel)
    cfg = OptimizerConfig(weight_decay=0.1, clip_grad=clip, shard_size_mb=40 / 2**20)
    models = [small_model(3), small_model(3)]
    buffers = [FlatParamsAndGrads(m) for m in models]
    opts = [DistributedAdam(b, cfg, single_process_group, 1, single_process_group) for b in buffers]
    store = _PingPong(opts[1].main_params.numel())
    opts[1].versions = store
    for step in range(4):
        _step_all(models, buffers, opts, step)
        assert opts[1].main_params.data_ptr() == store.sets[step % 2]["fp32_param"].data_ptr()
        for name in ("main_params", "exp_avg", "exp_avg_sq"):
            assert torch.equal(getattr(opts[0], name), getattr(opts[1], name)), (step, name)
        assert torch.equal(buffers[0].params, buffers[1].params)
    assert store.commits == 4
    assert max(len(shard.blocks) for shard in opts[1].shards) == (1 if block_numel > 40 else 2)


def _offload_pair(single_process_group, device):
    cfg = OptimizerConfig(weight_decay=0.1, clip_grad=1.0, shard_size_mb=40 / 2**20)
    models = [small_model(5).to(device), small_model(5).to(device)]
    buffers = [FlatParamsAndGrads(m) for m in models]
    opts = [DistributedAdam(b, c, single_process_group, 1, single_process_group)
            for b, c in zip(buffers, (cfg, dataclasses.replace(cfg, cpu_offload=True)))]
    return models, buffers, opts


def test_cpu_offload_keeps_the_optimizer_state_on_the_host(single_process_group):
    """``--optimizer-cpu-offload``: main weights and moments in host memory. On a CPU run that is
    where they are anyway: the steps are the same, bit for bit (the GPU case runs in
    test below, on a GPU machine)."""
    models, buffers, opts = _offload_pair(single_process_group, "cpu")
    assert opts[1].main_params.device.type == "cpu" and not opts[1]._grads_come_down
    for step in range(3):
        _step_all(models, buffers, opts, step)
    assert torch.equal(buffers[0].params, buffers[1].params)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpu_offload_on_a_gpu_steps_on_the_host(single_process_group):
    models, buffers, opts = _offload_pair(single_process_group, "cuda")
    assert opts[1].main_params.device.type == "cpu" and opts[1].main_params.is_pinned() and opts[1]._grads_come_down
    for step in range(3):
        _step_all(models, buffers, opts, step, "cuda")
    torch.testing.assert_close(buffers[0].params, buffers[1].params, rtol=1e-5, atol=1e-6)
