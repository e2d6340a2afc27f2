"""Unit tests of the load policy: what a layout change keeps of a vocabulary tensor, which settings
a load reports as changed, which checkpoints may hold padded rows, the flags; and, driven in one
process, what the policy does with each candidate and how a refusal names its reason."""

import pytest

from checkpointing.base.config import CheckpointConfig
from checkpointing.format import keys
from checkpointing.format.items import TensorPiece
from tests.helpers import synthetic_layout
from trainer.checkpoint_state import _true_rows, changed_settings

EMBEDDING = "embedding.word_embeddings.weight"


def _piece(key, rows, offset, global_rows, start=0):
    return TensorPiece(key=key, array="fp32_param", start=start, shape=(rows, 4), global_shape=(global_rows, 4),
                       global_offset=(offset, 0))


def test_a_vocabulary_piece_keeps_the_true_rows_only():
    # Vocabulary 100 padded to 128 (TP2: 64 rows per rank): rank 0 holds rows 0-63, all true.
    assert _true_rows(_piece(EMBEDDING, 64, 0, 128), 100) == _piece(EMBEDDING, 64, 0, 100)
    # Rank 1 holds rows 64-127: 36 true rows at its start, the rest padding.
    assert _true_rows(_piece(EMBEDDING, 64, 64, 128, start=256), 100) == _piece(EMBEDDING, 36, 64, 100, start=256)
    # A piece of padding only is not saved or loaded at all.
    assert _true_rows(_piece(EMBEDDING, 16, 112, 128), 100) is None
    # Without padding, and for any other tensor, the piece is unchanged.
    assert _true_rows(_piece(EMBEDDING, 64, 64, 128), 128) == _piece(EMBEDDING, 64, 64, 128)
    other = _piece("decoder.final_layernorm.weight", 64, 64, 128)
    assert _true_rows(other, 100) is other


def test_changed_settings_lists_what_differs_except_where_checkpoints_go():
    saved = {"lr": {"lr": 0.003, "warmup_iters": 2}, "parallel": {"tensor_parallel": 2},
             "checkpoint": {"load": None, "save": "a"}, "training": {"seed": 1}}
    now = {"lr": {"lr": 0.001, "warmup_iters": 2}, "parallel": {"tensor_parallel": 1},
           "checkpoint": {"load": "a", "save": "b"}, "training": {"seed": 1, "new_flag": True, "unset_flag": None},
           "imported_section": {"x": 1}}
    # A setting added since the checkpoint (set here) is listed; one left unset, and a section the
    # checkpoint never recorded (an imported model's), are not.
    assert changed_settings(saved, now) == [
        "lr.lr: 0.003 -> 0.001", "parallel.tensor_parallel: 2 -> 1", "training.new_flag: (not recorded) -> True"]
    assert changed_settings(saved, saved) == []


def test_keys_name_the_items_in_one_place():
    assert keys.rng_key(3) == "rng_state.rank_3" and keys.is_rng_key(keys.rng_key(3))
    assert keys.optimizer_key("exp_avg", EMBEDDING) == "optimizer.state.exp_avg." + EMBEDDING
    assert keys.is_optimizer_key(keys.optimizer_key("fp32_param", EMBEDDING)) and not keys.is_optimizer_key(EMBEDDING)


def test_finetune_flags():
    with pytest.raises(ValueError, match="--finetune needs --load"):
        CheckpointConfig(finetune=True)
    cfg = CheckpointConfig(load="ckpt", finetune=True)
    assert not cfg.loads_optimizer and not cfg.loads_rng
    cfg = CheckpointConfig(load="ckpt", load_optim=False)
    assert not cfg.loads_optimizer and cfg.loads_rng
    assert CheckpointConfig(load="ckpt").loads_optimizer


def test_only_a_format_1_checkpoint_may_hold_padded_rows():
    from checkpointing.format.reader import CheckpointReader

    reader = CheckpointReader.__new__(CheckpointReader)
    wanted = frozenset({EMBEDDING})
    reader.facts = {"format_version": 1}
    assert reader.padded_rows_allowed(wanted) == wanted
    reader.facts = {"format_version": 2}
    assert reader.padded_rows_allowed(wanted) == frozenset()


# -- the load policy's refusals, driven in one process ---------------------------------------------

TP2_DP2 = synthetic_layout(data_parallel=2, tensor_parallel=2)
"""The layout of a job that ran on two nodes; the synthetic state's own is TP1xDP1."""

class _LoadedState:
    """A synthetic state that records what its ``after_load`` was given."""

    def __init__(self):
        from tests.helpers import SyntheticState

        self.synthetic = SyntheticState(shard_numel=64)
        self.legacy_padded_keys = frozenset()
        self.loaded = None

    def __getattr__(self, name):
        return getattr(self.synthetic, name)

    def after_load(self, small_state, loaded):
        self.loaded = loaded
        return []


def _save(root, iteration, state, layout, group, node_local=False):
    """Commit ``state`` as ``root/iter_N`` saved in ``layout``; ``node_local``: as one node's L1
    directory holds it (its metadata names the files the node holds)."""
    from checkpointing.base.levels import Level
    from checkpointing.format.commit import save_and_commit
    from checkpointing.format.metadata import read_metadata, write_metadata

    result = save_and_commit(Level("L1" if node_local else "L2", str(root), None, None), iteration, state.arrays,
                             state.save_pieces, state.capture_small_state(iteration), layout, group)
    if node_local:
        metadata = read_metadata(result.path)
        del metadata.gpt_ckpt_full_unpickling, metadata.gpt_ckpt_verified  # what read_metadata adds
        metadata.gpt_ckpt["local_files"] = ["__0_0.distcp"]
        write_metadata(result.path, metadata)
    return result.path


def _loader(tmp_path, group, logs, **cfg):
    from checkpointing.recovery.loading import CheckpointLoader

    l2 = tmp_path / "shared"
    l2.mkdir(exist_ok=True)
    config = CheckpointConfig(save=str(l2), load=str(l2), async_save=True, local_dir=str(tmp_path / "local"),
                              local_interval=4, **cfg)
    state = _LoadedState()
    return CheckpointLoader(config, state, group, logs.append), state


def test_a_node_local_checkpoint_of_another_layout_is_refused_as_such_not_as_damaged(tmp_path, single_process_group):
    """Two nodes ran at TP2xDP2; one restarts alone at TP1xDP1. Its L1 holds its own ranks' files
    of that layout, ``--save`` holds nothing: nothing fits, and nothing is damaged."""
    from checkpointing.base.errors import CheckpointNotFoundError

    logs = []
    loader, state = _loader(tmp_path, single_process_group, logs)
    local = _save(tmp_path / "local", 8, state, TP2_DP2, single_process_group, node_local=True)
    with pytest.raises(CheckpointNotFoundError) as refused:
        loader.load()
    assert local == str(tmp_path / "local" / "iter_0000008")
    message = str(refused.value).replace(str(tmp_path), "CKPT")  # the test's name is in its directory's
    assert message == ("No checkpoint fits this layout: CKPT/local/iter_0000008 is node-local and was saved at "
                       "TP2xDP2 (this run: TP1xDP1); a node holds only its own ranks' files: load from L2 (--load) or "
                       "restart in that layout; --load CKPT/shared holds no committed checkpoint")
    logs = [line.replace(str(tmp_path), "CKPT") for line in logs]
    assert "damaged" not in message and not any("damaged" in line or "WARNING" in line for line in logs), logs
    assert state.loaded is None


def test_a_node_local_checkpoint_is_passed_over_for_the_shared_level(tmp_path, single_process_group):
    """The same node-local checkpoint, and an older one in ``--save``: that one loads."""
    import torch

    logs = []
    loader, state = _loader(tmp_path, single_process_group, logs)
    _save(tmp_path / "local", 8, state, TP2_DP2, single_process_group, node_local=True)
    saved = {name: array.clone() for name, array in state.arrays.items()}
    _save(tmp_path / "shared", 4, state, state.layout, single_process_group)
    for array in state.arrays.values():
        array.zero_()
    assert loader.load() == (4, None)
    assert state.loaded.iteration == 4 and state.loaded.source == "L2"
    assert all(torch.equal(state.arrays[name], saved[name]) for name in saved)
    logs = [line.replace(str(tmp_path), "CKPT") for line in logs]
    assert any("passed over" in line and "saved at TP2xDP2" in line for line in logs), logs
    assert not any("damaged" in line or "WARNING" in line for line in logs), logs


def test_damaged_is_said_only_of_what_is_damaged(tmp_path, single_process_group):
    """The node-local checkpoint of another layout, and a damaged one in ``--save``: the error
    names each for what it is."""
    from checkpointing.base.errors import CheckpointCorruptError

    logs = []
    loader, state = _loader(tmp_path, single_process_group, logs)
    local = _save(tmp_path / "local", 8, state, TP2_DP2, single_process_group, node_local=True)
    shared = _save(tmp_path / "shared", 4, state, state.layout, single_process_group)
    with open(f"{shared}/__0_0.distcp", "r+b") as f:
        f.write(b"garbage")
    with pytest.raises(CheckpointCorruptError) as refused:
        loader.load()
    assert (local, shared) == (str(tmp_path / "local" / "iter_0000008"), str(tmp_path / "shared" / "iter_0000004"))
    message = str(refused.value).replace(str(tmp_path), "CKPT")
    assert message.startswith("No checkpoint can be loaded: CKPT/local/iter_0000008 is node-local and was saved at "
                              "TP2xDP2 (this run: TP1xDP1); ")
    assert message.endswith("; CKPT/shared/iter_0000004 is damaged (see the warnings above); nothing was deleted. "
                            "Start from scratch with another --load, or repair the files")
    assert message.count("damaged") == 1
    logs = [line.replace(str(tmp_path), "CKPT") for line in logs]
    assert [line for line in logs if "damaged" in line] == [
        "WARNING: checkpoint CKPT/shared/iter_0000004 is damaged, trying the previous committed one: rank 0: checksum "
        "mismatch in CKPT/shared/iter_0000004/__0_0.distcp (tensor a, written by rank 0) at offset 0"]


def test_a_node_local_checkpoint_does_not_serve_a_weights_only_load(tmp_path, single_process_group):
    from checkpointing.base.errors import CheckpointNotFoundError

    logs = []
    loader, state = _loader(tmp_path, single_process_group, logs, load_optim=False)
    _save(tmp_path / "local", 8, state, state.layout, single_process_group, node_local=True)
    with pytest.raises(CheckpointNotFoundError, match="No checkpoint fits this run: .* is node-local, which restores "
                                                      "the optimizer state; --no-load-optim") as refused:
        loader.load()
    assert "damaged" not in str(refused.value)


def test_outcomes_agree_on_the_gravest():
    from checkpointing.recovery.load_outcome import Attempt, Outcome, agree

    loaded, other = Attempt(Outcome.LOADED), Attempt(Outcome.OTHER_LAYOUT, "x is node-local")
    assert agree([loaded, loaded]) == loaded
    assert agree([other, other]) == other
    damaged = agree([loaded, Attempt(Outcome.DAMAGED, "checksum mismatch"), Attempt(Outcome.DAMAGED, "truncated")])
    assert damaged == Attempt(Outcome.DAMAGED, "rank 1: checksum mismatch; rank 2: truncated")
    assert agree([Attempt(Outcome.DAMAGED, "d"), Attempt(Outcome.MISMATCH, "m")]).outcome is Outcome.MISMATCH
    assert agree([Attempt(Outcome.UNTRUSTED, "u"), Attempt(Outcome.DAMAGED, "d")]).outcome is Outcome.UNTRUSTED
    assert Outcome.OTHER_LAYOUT.passed_over and Outcome.WEIGHTS_ONLY.passed_over and not Outcome.DAMAGED.passed_over


def test_the_parallel_layout_keeps_its_on_disk_form():
    """The dict a checkpoint records, key for key, in the order every format wrote it."""
    from checkpointing.base.parallel_layout import ParallelLayout

    saved = {"tensor_parallel": 2, "pipeline_parallel": 1, "data_parallel": 1, "distributed_optimizer": False,
             "num_layers": 2, "bf16": False}  # as tests/fixtures/ckpt_v1_tp2_vocab100 records it
    layout = ParallelLayout.from_dict(saved)
    assert layout == ParallelLayout(2, 1, 1, False, 2, False) and list(layout.to_dict().items()) == list(saved.items())
    assert ParallelLayout.from_dict({"tensor_parallel": 1}) is None and ParallelLayout.from_dict(None) is None
    assert layout.describe() == "TP2xDP1" and ParallelLayout(2, 2, 1, True, 2, False).describe() == "TP2xPP2xDP1"
    assert layout.how_saved(ParallelLayout(2, 1, 1, True, 2, False)) == (
        "saved without the distributed optimizer (this run: with)")
