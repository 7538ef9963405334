"""Orbax checkpoints: round trip, restore into the sharded layout, and corrupt directories."""

import json
import shutil

import jax
import numpy as np
import pytest

from jaxinfer.checkpoint import read_checkpoint_info, restore_params, save_checkpoint
from jaxinfer.config import ModelConfig
from jaxinfer.convert import CheckpointError, ConvertedModel
from jaxinfer.mesh import make_mesh
from jaxinfer.model.params import init_random_params
from jaxinfer.rules import load_rules
from jaxinfer.sharding import ShardingPlan

CONFIG = ModelConfig(family="qwen2", vocab_size=128, embed_dim=32, mlp_dim=64, num_layers=2,
                     num_heads=8, num_kv_heads=2, head_dim=8, max_seq_len=64, qkv_bias=True,
                     eos_token_ids=(3,))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    params = init_random_params(CONFIG, seed=3)
    path = tmp_path_factory.mktemp("ckpt") / "model"
    save_checkpoint(path, ConvertedModel(CONFIG, params, tokenizer=None, source="random"))
    return path, params


def copy_checkpoint(checkpoint, tmp_path):
    """Copy the module's checkpoint, for a test to break."""
    path, _ = checkpoint
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    return copy


def restore_failure(path):
    """Restore a broken checkpoint, expecting CheckpointError; return its message."""
    with pytest.raises(CheckpointError) as error:
        restore_into(path)
    return str(error.value)


def restore_into(path, table_name="tp"):
    info = read_checkpoint_info(path)
    table = load_rules(table_name)
    mesh = make_mesh(table.mesh, jax.devices())
    plan = ShardingPlan.build(info.config, table, mesh, slots=8, cache_len=64)
    return restore_params(info, plan.param_shardings(), "float32"), plan


def test_metadata_round_trip(checkpoint):
    path, _ = checkpoint
    info = read_checkpoint_info(path)
    assert info.config == CONFIG
    assert info.source == "random"
    assert info.tokenizer_meta is None


def test_restored_values_equal_saved(checkpoint):
    path, params = checkpoint
    restored, _ = restore_into(path)
    np.testing.assert_array_equal(np.asarray(restored["embed"]), params["embed"])
    np.testing.assert_array_equal(np.asarray(restored["layers"][1]["bq"]), params["layers"][1]["bq"])
    np.testing.assert_array_equal(np.asarray(restored["layers"][0]["w_down"]), params["layers"][0]["w_down"])


def test_restore_places_only_local_shards(checkpoint):
    path, _ = checkpoint
    restored, plan = restore_into(path)
    wq = restored["layers"][0]["wq"]  # [embed, q_heads, head_dim], q_heads on tensor=8
    assert wq.sharding.spec == plan.param_shardings()["layers"][0]["wq"].spec
    assert {shard.data.shape for shard in wq.addressable_shards} == {(32, 1, 8)}
    assert len(wq.addressable_shards) == 8


def test_restore_casts_dtype(checkpoint):
    path, _ = checkpoint
    info = read_checkpoint_info(path)
    table = load_rules("tp")
    plan = ShardingPlan.build(info.config, table, make_mesh(table.mesh), slots=8, cache_len=64)
    restored = restore_params(info, plan.param_shardings(), "bfloat16")
    assert restored["embed"].dtype == jax.numpy.bfloat16


def test_save_into_non_empty_directory(checkpoint, tmp_path):
    (tmp_path / "something").write_text("x")
    model = ConvertedModel(CONFIG, init_random_params(CONFIG), tokenizer=None, source="random")
    with pytest.raises(FileExistsError, match="is not empty; choose a new output directory"):
        save_checkpoint(tmp_path, model)


def test_save_rejects_wrong_shapes(tmp_path):
    params = init_random_params(CONFIG)
    params["layers"][0]["wk"] = np.zeros((32, 3, 8), np.float32)
    expected = r"parameter /layers/0/wk has shape \(32, 3, 8\), expected \(32, 2, 8\)"
    with pytest.raises(ValueError, match=expected):
        save_checkpoint(tmp_path / "bad", ConvertedModel(CONFIG, params, None, "random"))


def test_missing_metadata(checkpoint, tmp_path):
    copy = copy_checkpoint(checkpoint, tmp_path)
    (copy / "jaxinfer.json").unlink()
    with pytest.raises(CheckpointError, match="is not a jaxinfer checkpoint .* interrupted"):
        read_checkpoint_info(copy)


def test_corrupt_metadata(checkpoint, tmp_path):
    copy = copy_checkpoint(checkpoint, tmp_path)
    (copy / "jaxinfer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="jaxinfer.json is corrupt"):
        read_checkpoint_info(copy)


def test_metadata_with_wrong_version(checkpoint, tmp_path):
    copy = copy_checkpoint(checkpoint, tmp_path)
    metadata = json.loads((copy / "jaxinfer.json").read_text())
    metadata["format_version"] = 99
    (copy / "jaxinfer.json").write_text(json.dumps(metadata))
    with pytest.raises(CheckpointError, match="format_version 99 is not supported"):
        read_checkpoint_info(copy)


def test_missing_params(checkpoint, tmp_path):
    copy = copy_checkpoint(checkpoint, tmp_path)
    shutil.rmtree(copy / "params")
    message = restore_failure(copy)
    assert "could not read the parameter metadata" in message
    assert "corrupt or incomplete; convert the model again" in message


def test_truncated_params(checkpoint, tmp_path):
    copy = copy_checkpoint(checkpoint, tmp_path)
    data_files = [p for p in (copy / "params").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert data_files, "expected Orbax data files under params/"
    for data_file in data_files:
        data_file.write_bytes(data_file.read_bytes()[:10])
    assert "corrupt or incomplete; convert the model again" in restore_failure(copy)


def test_params_of_another_model(checkpoint, tmp_path):
    copy = copy_checkpoint(checkpoint, tmp_path)
    metadata = json.loads((copy / "jaxinfer.json").read_text())
    metadata["model"]["mlp_dim"] = 128
    (copy / "jaxinfer.json").write_text(json.dumps(metadata))
    message = restore_failure(copy)
    assert "parameter layers.0.w_gate has shape (32, 64)" in message
    assert "expects (32, 128)" in message


def test_truncated_array_data(checkpoint, tmp_path):
    copy = copy_checkpoint(checkpoint, tmp_path)
    chunks = list((copy / "params" / "ocdbt.process_0" / "d").iterdir())
    assert chunks, "expected Orbax array data under params/ocdbt.process_0/d"
    for chunk in chunks:
        chunk.write_bytes(chunk.read_bytes()[: len(chunk.read_bytes()) // 2])
    message = restore_failure(copy)
    assert "corrupt or incomplete; convert the model again" in message


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    import jaxinfer.checkpoint as checkpoint_module

    def fail(directory, model, dtype):
        (directory / "params").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module, "_write_checkpoint", fail)
    model = ConvertedModel(CONFIG, init_random_params(CONFIG), tokenizer=None, source="random")
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "model", model)
    assert list(tmp_path.iterdir()) == []


def test_cache_key_follows_inputs(tmp_path):
    from jaxinfer.checkpoint import converted_cache_dir

    source = tmp_path / "hf"
    source.mkdir()
    (source / "config.json").write_text("{}")
    (tmp_path / "tok.model").write_text("x")
    plain = converted_cache_dir(source, tmp_path / "cache")
    with_tokenizer = converted_cache_dir(source, tmp_path / "cache", tmp_path / "tok.model")
    (source / "config.json").write_text('{"edited": true}')
    edited = converted_cache_dir(source, tmp_path / "cache")
    assert len({plain, with_tokenizer, edited}) == 3


def test_interrupted_checkpoint_named(tmp_path):
    from jaxinfer.load import resolve_checkpoint

    (tmp_path / "ckpt" / "params").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="incomplete jaxinfer checkpoint .* interrupted conversion"):
        resolve_checkpoint(tmp_path / "ckpt")


def test_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file, not a jaxinfer checkpoint directory"):
        read_checkpoint_info(path)
