"""Adding a layer kind and an elastic axis touches only the kind module, the axis registration and
config parsing (issue 32): `tests/toy_kind.py` declares a gated-unit kind "T" with its own axis
`toy_units`; registered with `kinds.register`, the generic code runs it: forward (plain, scanned,
soft), masked == sliced (with a built-in axis at once), its declared cost against XLA's count of
the compiled layer and the parameter arrays, and its HF export rules.

The registration changes process-wide tables (`Widths` gains a field), so the checks run in a
subprocess (`python tests/test_toy_kind.py`)."""
import json
import math
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.slow
def test_toy_kind_and_axis_run_through_the_generic_code():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, os.path.join(HERE, "test_toy_kind.py")], capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["masked_vs_sliced"] < 1e-5 and got["full_vs_plain"] < 1e-6 and got["scanned_vs_unrolled"] < 1e-5
    assert got["layer_vs_reference"] < 1e-5
    assert abs(got["flops_declared"] / got["flops_xla"] - 1) < 0.05, got
    assert got["weight_bytes_declared"] == got["weight_bytes_arrays"]


def test_mamba_channel_options_respect_the_quantization_block():
    """`_quant_unit` is read from the axes' declarations: the head-channel axis is a reduction
    dimension (out_proj rows = heads x channels), so NVFP4 options must keep it a multiple of 16."""
    import elastic_jax as ej
    from elastic_jax.elastic.config import ElasticConfig, _quant_unit
    cfg = ej.NemotronHConfig(hybrid_override_pattern="M*-E", mamba_head_dim=16, n_groups=2)
    assert _quant_unit(cfg, "mamba_channels") == 8 and _quant_unit(cfg, "moe_experts") == 1
    only = dict(hidden_options=None, mamba_options=None, ffn_options=None, moe_expert_options=None,
                moe_ffn_options=None, quantization="nvfp4")
    ok = ElasticConfig(mamba_channel_options=(16, 8), **only).options(cfg)
    assert ok == {"mamba_channels": ok["mamba_channels"]} and ok["mamba_channels"].tolist() == [16, 8]
    with pytest.raises(ValueError, match="mamba_channel_options.*12 must be a multiple of 8"):
        ElasticConfig(mamba_channel_options=(16, 12), **only).options(cfg)
    assert ElasticConfig(mamba_channel_options=(16, 12), **dict(only, quantization=None)).options(cfg)


# ------------------------------------------------------------------------ the subprocess
def _main() -> dict:
    import tempfile

    import jax
    import jax.numpy as jnp
    import numpy as np
    from safetensors.numpy import load_file

    import elastic_jax as ej
    import toy_kind
    from elastic_jax.hf import save_hf
    from elastic_jax.model import kinds
    from elastic_jax.model.kinds.base import count, quantizable
    from elastic_jax.model.layers import Context
    from elastic_jax.model.cost import CostModel, Mode

    def diff(a, b):
        return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))

    small = dict(hybrid_override_pattern="MT*T", vocab_size=64, hidden_size=32, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, mamba_num_heads=4, mamba_head_dim=8, n_groups=2,
                 ssm_state_size=8, chunk_size=8, toy_units=48)
    try:                                  # config parsing knows the character once the kind registers
        toy_kind.ToyConfig(**small)
        raise AssertionError("an unregistered pattern character was accepted")
    except ValueError as e:
        assert "unknown layer characters ['T']" in str(e), e
    assert "toy_units" not in {f for f in ej.Widths.__dataclass_fields__}
    kinds.register(toy_kind)
    assert "toy_units" in ej.Widths.__dataclass_fields__ and "toy_units" in ej.SoftWidths.__dataclass_fields__

    cfg = toy_kind.ToyConfig(**small)
    params = ej.init_params(cfg, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, cfg.vocab_size)
    plain = ej.forward(params, tokens, cfg)
    assert bool(jnp.all(jnp.isfinite(plain)))
    out = {"full_vs_plain": diff(ej.forward(params, tokens, cfg, ej.Widths.full(cfg)), plain)}
    scanned = ej.forward(params, tokens, cfg, policy=ej.ComputePolicy(scan_layers=True))
    out["scanned_vs_unrolled"] = diff(scanned, plain)
    try:
        ej.Widths(toy_units=64).validate(cfg)
        raise AssertionError("a toy width over the parent size was accepted")
    except ValueError as e:
        assert "Widths.toy_units" in str(e) and "exceeds the parent size 48" in str(e), e

    w = ej.Widths(toy_units=32, mamba_heads=2, hidden=24)
    sub_cfg, sub_params = ej.slice_params(params, cfg, w)
    assert sub_cfg.toy_units == 32 and sub_params["layers"][1]["mixer"]["up_proj"].shape == (24, 32)
    out["masked_vs_sliced"] = diff(ej.forward(params, tokens, cfg, w), ej.forward(sub_params, tokens, sub_cfg))
    soft = ej.SoftWidths.from_options(cfg, {"toy_units": [48, 32]}, {"toy_units": [0.25, 0.75]})
    mixed = ej.forward(params, tokens, cfg, soft)
    assert bool(jnp.all(jnp.isfinite(mixed))) and diff(mixed, plain) > 1e-4

    # one toy layer at 32 units: its mixer with the masks == a plain slice (independent reference)
    p1 = params["layers"][1]["mixer"]
    x = jax.random.normal(jax.random.PRNGKey(2), (1, 5, cfg.hidden_size))
    el = toy_kind.masks(cfg, ej.Widths(toy_units=32).to_soft(cfg), 0, p1)
    y, _ = toy_kind.apply(p1, x, cfg, el, Context(), None)
    out["layer_vs_reference"] = diff(y, toy_kind.reference(p1, x, 32))

    # declared cost: FLOPs per token vs XLA's count of the compiled layer; bytes vs the arrays
    sp1 = sub_params["layers"][1]["mixer"]
    T = 64
    fn = jax.jit(lambda p, x: toy_kind.apply(p, x, sub_cfg, None, Context(), None)[0])
    ca = fn.lower(sp1, jnp.zeros((1, T, sub_cfg.hidden_size))).compile().cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    out["flops_xla"] = float(ca["flops"]) / T
    # ... as the one cost model (`model.cost`) sums it for the nested model
    cm = CostModel(cfg, w)
    toy_layers = [L for L in cm.layers if L.kind is toy_kind]
    assert len(toy_layers) == 2 and toy_layers[0].sizes == {"embed": sub_cfg.hidden_size, "mlp": 32}
    L, mode = toy_layers[0], Mode.decode(0)
    out["flops_declared"] = sum(L.kind.flops(cfg, L.sizes, mode).values())
    out["weight_bytes_declared"] = 2.0 * L.kind.weights_read(cfg, L.sizes, mode)
    assert cm.param_count() == sum(int(np.prod(a.shape)) for a in jax.tree.leaves(sub_params))
    out["weight_bytes_arrays"] = 2.0 * sum(int(np.prod(a.shape)) for a in sp1.values())
    assert count(toy_kind.params(cfg), kinds.layer_sizes(cfg, 1)) == sum(
        math.prod(a.shape) for a in params["layers"][1]["mixer"].values())
    assert ej.param_count(cfg) == sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))

    # export: the toy rules write its tensors in the HF layout, read back by the same rules
    assert quantizable(toy_kind) == {"gate_proj": "mixer.gate_proj", "up_proj": "mixer.up_proj",
                                     "down_proj": "mixer.down_proj"}
    with tempfile.TemporaryDirectory() as d:
        save_hf(os.path.join(d, "m"), cfg, params)
        conf = json.load(open(os.path.join(d, "m", "config.json")))
        assert conf["layers_block_type"] == ["linear_attention", "toy", "full_attention", "toy"], conf
        tensors = load_file(os.path.join(d, "m", "model.safetensors"))
    dims = kinds.layer_dims(cfg, 3)
    for rule in toy_kind.HF_RULES:
        got = tensors[rule.key(3)]
        assert got.shape == rule.shape(dims), (rule.hf, got.shape)
        back = rule.load(got, dims)[0]
        np.testing.assert_array_equal(back, np.asarray(params["layers"][3]["mixer"][rule.params[0]]))
    assert sorted(k for k in tensors if k.startswith("backbone.layers.1.")) == sorted(
        ["backbone.layers.1.norm.weight"] + [r.key(1) for r in toy_kind.HF_RULES])
    return out


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    print(json.dumps(_main()))
