"""Per-layer-kind temporaries of the elastic KD step on the local backend, for remat none / full /
full + scanned layers (argv: context length, comma-separated patterns). A probe, not a benchmark."""
import sys, jax, jax.numpy as jnp
import elastic_jax as ej
from elastic_jax import aot
from elastic_jax.train.aot_step import abstract_elastic_step
from elastic_jax.train.sharding import make_mesh
from elastic_jax.train.config import MeshConfig
from elastic_jax.elastic.config import ElasticConfig
sys.path.insert(0, "experiments"); from bench_pod_memory import NANO3
L = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
small = dict(NANO3, hidden_size=256, mamba_num_heads=8, mamba_head_dim=32, n_groups=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, n_routed_experts=16, moe_intermediate_size=128,
             moe_shared_expert_intermediate_size=256, intermediate_size=512, vocab_size=4096, ssm_state_size=32, n_group=1, topk_group=1)
mesh = make_mesh(MeshConfig(), devices=jax.devices()[:1])
for pat in sys.argv[2].split(","):
    cfg = ej.NemotronHConfig.from_hf(dict(small, num_hidden_layers=len(pat), hybrid_override_pattern=pat))
    for remat, scan in [("none", False), ("full", False), ("full", True)]:
        pol = ej.ComputePolicy(remat=remat, scan_layers=scan)
        fn, args = abstract_elastic_step(cfg, ElasticConfig(), mesh, batch=1, length=L, param_dtype=jnp.float32, policy=pol)
        r = aot.compile_report(fn, *args, mesh=mesh)
        print(f"{pat:8} L={L} remat={remat:5} scan={scan!s:5} temp={r.temp_bytes/2**20:8.1f} MiB", flush=True)
