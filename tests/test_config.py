"""NemotronHConfig: HF names and legacy aliases, validation errors."""
import json

import pytest

import elastic_jax as ej

NANO_V3_LIKE = {
    "model_type": "nemotron_h", "vocab_size": 131072, "hidden_size": 2688,
    "hybrid_override_pattern": "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME",
    "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 128, "mamba_num_heads": 64,
    "mamba_head_dim": 64, "mamba_n_groups": 8, "ssm_state_size": 128, "mamba_d_conv": 4, "chunk_size": 128,
    "num_local_experts": 128, "num_experts_per_tok": 6, "moe_intermediate_size": 1856,
    "moe_shared_expert_intermediate_size": 3712, "n_group": 1, "topk_group": 1, "norm_topk_prob": True,
    "routed_scaling_factor": 2.5, "layer_norm_epsilon": 1e-5, "time_step_limit": [0.0, float("inf")],
    "rope_theta": 10000, "mtp_hybrid_override_pattern": "*E", "num_nextn_predict_layers": 1,
}


def test_from_hf_legacy_aliases(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(NANO_V3_LIKE))
    cfg = ej.NemotronHConfig.from_hf(tmp_path)
    assert cfg.n_groups == 8 and cfg.n_routed_experts == 128 and cfg.conv_kernel == 4
    assert cfg.count("M") == 23 and cfg.count("E") == 23 and cfg.count("*") == 6
    assert cfg.d_inner == 4096 and cfg.conv_dim == 4096 + 2 * 8 * 128
    assert cfg.pattern == NANO_V3_LIKE["hybrid_override_pattern"]


def test_layers_block_type_and_round_trip():
    cfg = ej.NemotronHConfig()
    d = cfg.to_hf()
    assert d["layers_block_type"] == ["linear_attention", "moe", "linear_attention", "full_attention", "mlp", "moe"]
    back = ej.NemotronHConfig.from_hf(d)
    assert back == cfg
    old_names = dict(d, layers_block_type=["mamba", "moe", "mamba2", "attention", "mlp", "moe"])
    assert ej.NemotronHConfig.from_hf(old_names).pattern == cfg.pattern
    assert ej.NemotronHConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="NemotronHConfig.from_dict: unknown fields"):
        ej.NemotronHConfig.from_dict(dict(cfg.to_dict(), hiden_size=3))


@pytest.mark.parametrize("kw,field", [
    (dict(hybrid_override_pattern="MX*"), "hybrid_override_pattern"),
    (dict(num_attention_heads=5, num_key_value_heads=2), "num_attention_heads"),
    (dict(mamba_num_heads=6, n_groups=4), "mamba_num_heads"),
    (dict(n_routed_experts=6, n_group=4), "n_routed_experts"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(num_experts_per_tok=9, n_routed_experts=8), "num_experts_per_tok"),
    (dict(mlp_hidden_act="gelu"), "mlp_hidden_act"),
    (dict(tie_word_embeddings=True), "tie_word_embeddings"),
    (dict(ffn_per_layer=(10, 20)), "ffn_per_layer"),
])
def test_malformed_config_names_field(kw, field):
    with pytest.raises(ValueError, match=field):
        ej.NemotronHConfig(**kw)


@pytest.mark.parametrize("kw", [dict(kernel_impl="pallas"), dict(remat=True), dict(remat=False, kernel_impl=None)])
def test_runtime_knobs_moved_to_the_compute_policy(kw):
    """`kernel_impl` / `remat` are `ComputePolicy` fields, not model-config ones: an old experiment
    file that sets them gets one error naming the replacement; a config saved before the move (run
    meta, elastic_budgets.json) still reads, and still resumes (the knobs leave the comparison)."""
    from elastic_jax.train.checkpoint import comparable
    with pytest.raises(ValueError, match=r"NemotronHConfig\((kernel_impl|remat)=.*policy=ej\.ComputePolicy\("):
        ej.NemotronHConfig(**kw)
    cfg = ej.NemotronHConfig(vocab_size=96)
    with pytest.raises(ValueError, match=r"ComputePolicy\("):
        cfg.replace(**kw)
    assert not {"kernel_impl", "remat"} & set(cfg.to_dict())
    old = {**cfg.to_dict(), **kw}                        # as an earlier version saved it
    assert ej.NemotronHConfig.from_dict(old) == cfg
    assert comparable({"model": old, "teacher": old}) == comparable({"model": cfg.to_dict(), "teacher": cfg.to_dict()})
    with pytest.raises(ValueError, match="unknown fields"):   # only those two are dropped
        ej.NemotronHConfig.from_dict({**old, "kernel": "x"})


def test_from_hf_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        ej.NemotronHConfig.from_hf(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ej.NemotronHConfig.from_hf(tmp_path)
    with pytest.raises(ValueError, match="layers_block_type"):
        ej.NemotronHConfig.from_hf({"layers_block_type": ["mamba", "conv"]})
    het = ej.NemotronHConfig(ffn_per_layer=(64,))
    with pytest.raises(ValueError, match="heterogeneous"):
        het.to_hf()


def test_every_config_shares_the_base_round_trip_and_errors():
    """The config dataclasses share one base: to_dict -> JSON -> from_dict is the identity, an
    unknown field is refused by name, and a bad value names Config.field."""
    from elastic_jax.config_base import ConfigBase
    from elastic_jax.data import DataConfig
    from elastic_jax.elastic import ElasticConfig
    from elastic_jax.eval import EvalConfig
    from elastic_jax.train import TrainConfig
    from elastic_jax.train.config import MeshConfig, OptimConfig, Stage
    configs = [ej.NemotronHConfig(hybrid_override_pattern="M*-E", ffn_per_layer=(64,)), DataConfig(path=("a", "b")),
               ElasticConfig(budgets=(1.0, 0.5)), EvalConfig(transplant_pairs=((0.5, 1.0),)),
               MeshConfig(data=2), OptimConfig(lr=1e-3), Stage(seq_len=8, steps=2, budget_probs=(0.5, 0.5)),
               TrainConfig(stages=(Stage(steps=1, data=DataConfig(kind="synthetic")),), sharding_rules=(("embed", None),))]
    for c in configs:
        assert isinstance(c, ConfigBase)
        assert type(c).from_dict(json.loads(json.dumps(c.to_dict()))) == c, type(c).__name__
        with pytest.raises(ValueError, match=rf"{type(c).__name__}.from_dict: unknown fields \['bogus'\]"):
            type(c).from_dict({**c.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match=r"TrainConfig.from_dict: unknown fields \['bogus'\]"):
        TrainConfig.from_dict({"stages": [{"steps": 1}], "optim": {}, "bogus": 2})
    with pytest.raises(ValueError, match=r"Stage.from_dict: unknown fields \['step'\]"):
        TrainConfig.from_dict({"stages": [{"step": 1}]})
    with pytest.raises(ValueError, match=r"EvalConfig.n_problems=0: must be > 0"):
        EvalConfig(n_problems=0)
    with pytest.raises(ValueError, match=r"MeshConfig.data=0: must be an int >= 1"):
        MeshConfig(data=0)
