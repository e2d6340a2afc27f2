"""The checkpoint history (interop/history.py) on a stored checkpoint of format 1 (vocabulary
rows padded to TP2's 256): true rows only, checksums verified, layer groups."""

import shutil

import pytest
import torch

from checkpointing.base.errors import CheckpointCorruptError
from interop.history import checkpoint_history, checkpoint_paths, format_history, layer_of

FIXTURE = "tests/fixtures/ckpt_v1_tp2_vocab100"


def test_layers_group_the_weights():
    assert layer_of("decoder.layers.12.mlp.linear_fc1.weight") == "decoder.layers.12"
    assert layer_of("embedding.position_embeddings.weight") == "embedding"
    assert layer_of("decoder.final_layernorm.bias") == "final_layernorm"
    assert layer_of("output_layer.weight") == "output_layer"


def test_a_format1_checkpoint_counts_its_true_vocabulary_only(tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    (row,) = checkpoint_history([path for _, path in checkpoint_paths([FIXTURE])])
    dcp_to_torch_save(f"{FIXTURE}/iter_0000003", str(tmp_path / "full.pt"))
    full = torch.load(tmp_path / "full.pt", weights_only=False)
    vocab = "embedding.word_embeddings.weight"
    assert full[vocab].shape[0] == 256  # stored padded: rows 100.. are not the model's
    weights = {k: (v[:100] if k == vocab else v).double() for k, v in full.items()
               if isinstance(v, torch.Tensor) and not k.startswith("optimizer.")}
    assert row.weight_norm == pytest.approx(sum(float(w.square().sum()) for w in weights.values()) ** 0.5, rel=1e-9)
    v = {k: t.double() for k, t in full.items() if k.startswith("optimizer.state.exp_avg_sq.")}
    v[f"optimizer.state.exp_avg_sq.{vocab}"] = v[f"optimizer.state.exp_avg_sq.{vocab}"][:100]
    assert row.adam_v_mean == pytest.approx(sum(float(t.sum()) for t in v.values()) / sum(t.numel() for t in v.values()),
                                            rel=1e-9)
    assert row.update_norm is None and format_history([row])[1].split()[0] == "3"


def test_a_damaged_chunk_is_named(tmp_path):
    from checkpointing.format.reader import CheckpointReader

    shutil.copytree(FIXTURE, tmp_path / "ckpt")
    path = str(tmp_path / "ckpt" / "iter_0000003")
    info = next(i for idx, i in CheckpointReader(path).metadata.storage_data.items()
                if idx.fqn == "decoder.layers.1.mlp.linear_fc1.weight")
    data = bytearray((tmp_path / "ckpt" / "iter_0000003" / info.relative_path).read_bytes())
    data[info.offset + info.length - 8] ^= 0xFF
    (tmp_path / "ckpt" / "iter_0000003" / info.relative_path).write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match="decoder.layers.1.mlp.linear_fc1.weight"):
        checkpoint_history([path])
