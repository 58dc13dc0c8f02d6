"""Ahead-of-time TPU compiles on this CPU host (the `tpu-aot` extra, elastic_jax/aot.py): every
layer kind with bf16 and f32 parameters under both kernel implementations compiles for v5e and v5p,
and a shrunken elastic KD step fits a per-chip memory bound that [L, S] f32 attention scores or
replicated experts would break. Skipped, with the reason, where libtpu is not installed."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import elastic_jax as ej
from elastic_jax import aot

_REASON = aot.tpu_unavailable_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"TPU AOT compiles unavailable: {_REASON}")

# one layer of each kind; TPU-legal tiles (head_dim 64, Mamba head dim 16, chunk 64, L = 128)
CFG = ej.NemotronHConfig(vocab_size=128, hidden_size=64, hybrid_override_pattern="M*-E", num_attention_heads=4,
                         num_key_value_heads=2, head_dim=64, intermediate_size=128, mamba_num_heads=8,
                         mamba_head_dim=16, n_groups=2, ssm_state_size=32, chunk_size=64, n_routed_experts=8,
                         num_experts_per_tok=2, moe_intermediate_size=128, moe_shared_expert_intermediate_size=128)

# every value of each factor meets every value of every other factor (a strength-2 covering of
# topology x parameter dtype x kernel impl); ELASTIC_JAX_AOT_FULL=1 runs all eight
_ALL = [(t, d, k) for t in ("v5e:2x2", "v5p:2x2x2") for d in ("bfloat16", "float32") for k in ("xla", "pallas")]
_PAIRS = [("v5p:2x2x2", "bfloat16", "xla"), ("v5p:2x2x2", "float32", "pallas"),
          ("v5e:2x2", "bfloat16", "pallas"), ("v5e:2x2", "float32", "xla")]
import os  # noqa: E402
COMBOS = _ALL if os.environ.get("ELASTIC_JAX_AOT_FULL") else _PAIRS


@pytest.mark.parametrize("topology,dtype,impl", COMBOS)
@pytest.mark.slow
def test_every_layer_kind_compiles_for_tpu(topology, dtype, impl):
    """Forward of M, *, -, E (Pallas SSD / gmm as Mosaic kernels, splash attention) for one chip
    of the topology; the masked model (elastic widths) so the masks compile too."""
    mesh = Mesh(np.array(aot.tpu_devices(topology)[:1]), ("data",))
    params = jax.eval_shape(lambda: jax.tree.map(lambda x: x.astype(dtype), ej.init_params(CFG, jax.random.PRNGKey(0))))
    args = (aot.abstract_tree(params, NamedSharding(mesh, P())), aot.abstract((1, 128), jnp.int32, mesh),
            aot.abstract((1, 128), jnp.int32, mesh))
    widths = ej.Widths(hidden=48, mamba_heads=4, ffn=64, moe_experts=4, moe_ffn=64).resolve(CFG)
    policy = ej.ComputePolicy(kernel_impl=impl)
    fwd = jax.jit(lambda p, t, s: ej.forward(p, t, CFG, widths, segment_ids=s, policy=policy))
    rep = aot.compile_report(fwd, *args)
    assert rep.fits and rep.flops and rep.flops > 0
    assert 0 < rep.total_bytes < 64 * 2 ** 20, rep


def test_out_of_memory_is_a_report():
    """A program larger than a v5e chip's 16 GiB HBM: fits=False with the error, no exception."""
    mesh = Mesh(np.array(aot.tpu_devices("v5e:2x2")[:1]), ("data",))
    x = aot.abstract((1 << 16, 256), jnp.float32, mesh)
    rep = aot.compile_report(jax.jit(lambda x: jnp.tanh(x @ x.T)), x, available_bytes=aot.hbm_bytes("v5e:2x2"))
    assert not rep.fits and rep.error and rep.total_bytes is None


@pytest.mark.slow   # compiles a KD step for 8 TPU chips
def test_shrunken_elastic_kd_step_fits_per_chip_bound():
    """The training loop's elastic KD step (teacher + student + router + AdamW, bf16 parameters,
    FSDP=4 x expert=2: the expert-parallel MoE) on 8 v5p chips, one 1024-token sequence per chip.
    Measured (jax 0.10.2, libtpu 0.0.42): 58.0 MiB per chip with splash attention; the reference
    attention's f32 [kv, rep, L, S] scores (64 MiB per copy here) give 132.0 MiB; the MoE dispatch
    gathered by GSPMD (before part B) 126 MiB on fsdp=8 (BUILD_NOTES.md, issue 11)."""
    from elastic_jax.elastic.config import ElasticConfig
    from elastic_jax.train.aot_step import abstract_elastic_step
    from elastic_jax.train.config import MeshConfig
    from elastic_jax.train.sharding import make_mesh

    cfg = ej.NemotronHConfig(vocab_size=512, hidden_size=128, hybrid_override_pattern="*E", num_attention_heads=16,
                             num_key_value_heads=2, head_dim=64, intermediate_size=256, n_routed_experts=8,
                             num_experts_per_tok=2, moe_intermediate_size=256, moe_shared_expert_intermediate_size=256)
    mesh = make_mesh(MeshConfig(fsdp=4, expert=2), devices=aot.tpu_devices("v5p:2x2x2"))
    fn, args = abstract_elastic_step(cfg, ElasticConfig(router_dim=32), mesh, batch=8, length=1024)
    rep = aot.compile_report(fn, *args, mesh=mesh)
    assert rep.fits
    assert rep.total_bytes < BOUND_MIB * 2 ** 20, f"per-chip total {rep.total_bytes / 2 ** 20:.1f} MiB"


BOUND_MIB = 80
