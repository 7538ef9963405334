"""Rules tables: parsing, validation against a model and a mesh, and the error messages."""

import os

import jax
import pytest

from jaxinfer.config import ModelConfig
from jaxinfer.mesh import MeshError, make_mesh, parse_mesh_spec
from jaxinfer.rules import RULES_DIR, RulesError, RulesTable, load_rules
from jaxinfer.sharding import ShardingPlan

# SmolLM2-135M's attention shape: 9 query heads and 3 KV heads.
SMOLLM2_LIKE = ModelConfig(family="llama", vocab_size=512, embed_dim=576, mlp_dim=1536, num_layers=2,
                           num_heads=9, num_kv_heads=3, head_dim=64, max_seq_len=256)
# Head counts that every shipped table divides, with fewer KV heads than devices.
SMALL = ModelConfig(family="llama", vocab_size=512, embed_dim=64, mlp_dim=128, num_layers=2,
                    num_heads=8, num_kv_heads=4, head_dim=8, max_seq_len=256)


def plan_for(config: ModelConfig, text: str, slots: int = 8) -> ShardingPlan:
    table = RulesTable.from_string(text, name="test.toml")
    mesh = make_mesh(table.mesh, jax.devices(), where=table.name)
    return ShardingPlan.build(config, table, mesh, slots, 64)


def specs_by_name(plan: ShardingPlan) -> dict[tuple[str, str], tuple]:
    return {(row.name, row.phase): row.spec for row in plan.placements()}


TP8 = """
[mesh]
tensor = 8
[rules]
q_heads = "tensor"
kv_heads = "tensor"
mlp = "tensor"
"""


def test_shipped_tables_parse():
    names = sorted(p.name for p in RULES_DIR.glob("*.toml"))
    assert {"single.toml", "tp.toml", "dp_tp.toml"} <= set(names)
    for name in names:
        assert load_rules(name).name == name


def test_shipped_tables_have_a_comment():
    for path in RULES_DIR.glob("*.toml"):
        assert path.read_text().startswith("#"), f"{path.name} lacks its leading comment"


def test_load_by_short_name():
    assert load_rules("tp").name == "tp.toml"


def test_missing_table_lists_shipped():
    with pytest.raises(RulesError, match="not found; tables shipped with jaxinfer: .*tp.toml"):
        load_rules("no_such_table")


def test_tp_resolves_megatron_layout():
    specs = specs_by_name(plan_for(SMALL, TP8))
    assert specs[("layers[*].wq", "all")] == (None, "tensor", None)
    assert specs[("layers[*].wo", "all")] == ("tensor", None, None)
    assert specs[("layers[*].w_gate", "all")] == (None, "tensor")
    assert specs[("layers[*].w_down", "all")] == ("tensor", None)


def test_kv_heads_fewer_than_tensor_replicated():
    specs = specs_by_name(plan_for(SMALL, TP8))
    assert specs[("layers[*].wk", "all")] == (None, None, None)


def test_unknown_logical_axis():
    with pytest.raises(RulesError, match=r"\[rules\] heads: unknown logical axis 'heads'; logical axes are"):
        RulesTable.from_string('[rules]\nheads = "tensor"\n')


def test_unknown_mesh_axis():
    with pytest.raises(RulesError, match=r"\[rules\] mlp = 'model': unknown mesh axis 'model'"):
        RulesTable.from_string('[rules]\nmlp = "model"\n')


def test_unknown_mesh_axis_in_mesh_section():
    with pytest.raises(RulesError, match="unknown mesh axis 'fsdp'"):
        RulesTable.from_string("[mesh]\nfsdp = 2\n")


def test_unknown_section():
    with pytest.raises(RulesError, match=r"unknown section \[rule\]"):
        RulesTable.from_string('[rule]\nmlp = "tensor"\n')


def test_invalid_toml():
    with pytest.raises(RulesError, match="invalid TOML"):
        RulesTable.from_string("[rules\n")


def test_value_of_wrong_type():
    with pytest.raises(RulesError, match="expected a mesh axis name, a list of them, or"):
        RulesTable.from_string("[rules]\nmlp = 4\n")


def test_cache_axis_in_phase_section():
    with pytest.raises(RulesError, match=r"\[decode\] cache_sequence: the KV cache is shared"):
        RulesTable.from_string('[decode]\ncache_sequence = "context"\n')


def test_unsupported_option_value():
    with pytest.raises(RulesError, match="all_reduce = 'two_shot' is not supported"):
        RulesTable.from_string('[collectives]\nall_reduce = "two_shot"\n')


def test_mesh_mismatching_device_count():
    table = RulesTable.from_string("[mesh]\ntensor = 4\n", name="t4.toml")
    expected = "uses 4 devices but 8 are present; make the axis sizes multiply to 8"
    with pytest.raises(MeshError, match=expected):
        make_mesh(table.mesh, jax.devices(), where=table.name)


def test_mesh_fill_axis():
    table = RulesTable.from_string("[mesh]\ndata = 2\ntensor = -1\n")
    mesh = make_mesh(table.mesh, jax.devices())
    assert dict(mesh.shape) == {"data": 2, "context": 1, "tensor": 4, "expert": 1}


def test_mesh_two_fill_axes():
    with pytest.raises(RulesError, match="only one mesh axis may be -1"):
        RulesTable.from_string("[mesh]\ndata = -1\ntensor = -1\n")


def test_mesh_spec_override():
    table = load_rules("tp").with_mesh(parse_mesh_spec("data=2,tensor=4"))
    assert table.mesh == {"data": 2, "context": 1, "tensor": 4, "expert": 1}


def test_mesh_spec_malformed():
    with pytest.raises(MeshError, match="invalid mesh entry 'tensor:8'"):
        parse_mesh_spec("tensor:8")


def test_query_heads_not_divisible():
    with pytest.raises(RulesError) as error:
        plan_for(SMOLLM2_LIKE, TP8).placements()
    message = str(error.value)
    assert "[rules] q_heads = ['tensor']" in message
    assert "(size 9) into 8 shards (tensor=8)" in message
    assert "shard counts that divide 9: 1, 3, 9" in message
    assert "set q_heads = [] to replicate it" in message


def test_kv_heads_not_divisible_rejected():
    # 3 KV heads on tensor=2: more heads than shards, so replication does not apply.
    text = "[mesh]\ndata = 4\ntensor = 2\n[rules]\nkv_heads = \"tensor\"\n"
    with pytest.raises(RulesError, match=r"kv_heads \(size 3\) into 2 shards"):
        plan_for(SMOLLM2_LIKE, text).placements()


def test_two_axes_on_one_mesh_axis():
    text = "[mesh]\ntensor = 8\n[rules]\nembed = \"tensor\"\nmlp = \"tensor\"\n"
    with pytest.raises(RulesError, match="logical axes 'embed' and 'mlp' both on mesh axis 'tensor'"):
        plan_for(SMALL, text).placements()


def test_decode_override_applies_to_activations_only():
    text = "[mesh]\ntensor = 8\n[rules]\nmlp = \"tensor\"\n[decode]\nmlp = []\n"
    specs = specs_by_name(plan_for(SMALL, text))
    assert specs[("layers[*].w_up", "all")] == (None, "tensor")
    assert specs[("mlp_hidden", "prefill")] == (None, None, "tensor")
    assert specs[("mlp_hidden", "decode")] == (None, None, None)


def test_slots_round_up_to_batch_shards():
    text = "[mesh]\ndata = 8\n[rules]\nbatch = \"data\"\ncache_batch = \"data\"\n"
    plan = plan_for(SMALL, text, slots=3)
    assert plan.slots == 8


def test_sequence_sharding_raises_min_bucket():
    text = "[mesh]\ncontext = 8\n[rules]\nsequence = \"context\"\n[decode]\nsequence = []\n"
    plan = plan_for(SMALL, text)
    assert plan.min_bucket == 16
    assert specs_by_name(plan)[("residual", "prefill")] == (None, "context", None)


def test_sequence_sharded_in_decode_rejected():
    text = "[mesh]\ncontext = 8\n[rules]\nsequence = \"context\"\n"
    with pytest.raises(RulesError) as error:
        plan_for(SMALL, text).placements()
    assert "decode activation residual axis sequence (size 1)" in str(error.value)
    assert "add [decode] sequence = [] to replicate it in the decode step only" in str(error.value)


def test_section_given_as_value():
    with pytest.raises(RulesError, match=r"attention = 3 must be a section; write it as \[attention\]"):
        RulesTable.from_string("attention = 3\n")


def test_binary_table_file(tmp_path):
    path = tmp_path / "garbage.toml"
    path.write_bytes(bytes(range(256)))
    with pytest.raises(RulesError, match="is not a UTF-8 text file"):
        RulesTable.from_file(path)


def test_mesh_axis_given_twice():
    with pytest.raises(MeshError, match="mesh axis tensor is given twice"):
        parse_mesh_spec("tensor=2,tensor=4")


def test_huge_mesh_not_simulated(monkeypatch):
    from jaxinfer.mesh import ensure_host_devices

    monkeypatch.setenv("XLA_FLAGS", "")
    ensure_host_devices(16384)
    assert "device_count" not in os.environ["XLA_FLAGS"]
    ensure_host_devices(4)
    assert "--xla_force_host_platform_device_count=4" in os.environ["XLA_FLAGS"]


def test_hf_config_missing_keys():
    with pytest.raises(ValueError, match="missing num_attention_heads; is it the model's config.json"):
        ModelConfig.from_hf_config({"model_type": "llama", "vocab_size": 8, "hidden_size": 8,
                                    "intermediate_size": 8, "num_hidden_layers": 1})
