"""A paper experiment file shrunk for tests: the same structure (layer kinds, elastic axes, two
curriculum stages, targets) at tiny widths and depth. `SHRUNK_SOURCE` names the experiment file
(default: the 30B-A3B one); `SHRUNK_TOPOLOGY` the TPU slice of its TPU target."""
import dataclasses
import os

from elastic_jax.experiment import load_experiment
from elastic_jax.pod import tpu_accelerator_type
from elastic_jax.train import MeshConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = {"vocab_size": 512, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "intermediate_size": 128, "mamba_num_heads": 8, "mamba_head_dim": 16, "n_groups": 2, "ssm_state_size": 16,
        "chunk_size": 32, "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
        "moe_shared_expert_intermediate_size": 64}
HALVES = (1.0, 0.75, 0.5)


def shrink(xp, topology: str = "v5e:2x2"):
    pattern = "MEM*E" if "E" in xp.model.hybrid_override_pattern else "M-M*-"
    model = xp.model.replace(**TINY, hybrid_override_pattern=pattern, max_position_embeddings=4096)
    opt = lambda v: None if v is None else HALVES
    e = xp.elastic
    elastic = dataclasses.replace(e, hidden_options=opt(e.hidden_options), mamba_options=opt(e.mamba_options),
                                  ffn_options=opt(e.ffn_options), moe_expert_options=opt(e.moe_expert_options),
                                  moe_ffn_options=opt(e.moe_ffn_options), router_dim=16)
    stages = tuple(dataclasses.replace(s, seq_len=s.seq_len // 256, batch_size=max(8, s.batch_size // 96 // 8 * 8),
                                       tokens=s.tokens / 1e6) for s in xp.train.stages)
    policy = xp.train.policy
    if policy is not None and policy.moe_token_chunk:        # the MoE token chunks shrink with the context
        policy = dataclasses.replace(policy, moe_token_chunk=max(1, policy.moe_token_chunk // 256))
    train = dataclasses.replace(xp.train, stages=stages, microbatches=2, vocab_chunk=256, policy=policy)
    n = 1
    for d in topology.split(":")[1].split("x"):
        n *= int(d)
    targets = tuple(dataclasses.replace(t, name=tpu_accelerator_type(topology), topology=topology,
                                        mesh=MeshConfig(fsdp=n), microbatches=None)
                    if t.platform == "tpu" else dataclasses.replace(t, microbatches=None, mesh=MeshConfig(fsdp=t.devices))
                    for t in xp.targets)
    return dataclasses.replace(xp, name=xp.name + "_shrunk", model=model, elastic=elastic, train=train,
                               targets=targets)


def config(quick: bool = False):
    src = os.environ.get("SHRUNK_SOURCE", os.path.join(ROOT, "experiments", "nemotron3_nano_30b_a3b.py"))
    return shrink(load_experiment(src), os.environ.get("SHRUNK_TOPOLOGY", "v5e:2x2"))
