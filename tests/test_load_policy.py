"""Unit tests of the load policy's pieces: what a layout change keeps of a vocabulary tensor, which
settings a load reports as changed, which checkpoints may hold padded rows, the flags."""

import pytest

from checkpointing import keys
from checkpointing.config import CheckpointConfig
from checkpointing.items import TensorPiece
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
    from checkpointing.reader import CheckpointReader

    reader = CheckpointReader.__new__(CheckpointReader)
    wanted = frozenset({EMBEDDING})
    reader.facts = {"format_version": 1}
    assert reader.padded_rows_allowed(wanted) == wanted
    reader.facts = {"format_version": 2}
    assert reader.padded_rows_allowed(wanted) == frozenset()
