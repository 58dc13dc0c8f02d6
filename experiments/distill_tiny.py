"""A tiny elastic distillation: random hybrid parent (pattern M*-E) -> budgets (1.0, 0.6) on
synthetic documents, two curriculum stages (uniform budgets at 32 tokens, then skewed to the full
model at 64 tokens). Used by the resume and sharding tests.

    elastic-jax run experiments/distill_tiny.py --quick --out runs/distill_tiny
"""
from elastic_jax import NemotronHConfig
from elastic_jax.data import DataConfig
from elastic_jax.elastic.config import ElasticConfig
from elastic_jax.experiment import DistillConfig
from elastic_jax.train import MeshConfig, OptimConfig, Stage, TrainConfig


def config(quick: bool = False) -> DistillConfig:
    model = NemotronHConfig(
        vocab_size=128, hidden_size=32, hybrid_override_pattern="M*-E",
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=64,
        mamba_num_heads=4, mamba_head_dim=8, n_groups=2, ssm_state_size=8, chunk_size=16,
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        moe_shared_expert_intermediate_size=16)
    elastic = ElasticConfig(budgets=(1.0, 0.6), router_dim=16, hidden_options=(1.0, 0.75),
                            mamba_options=(1.0, 0.5), ffn_options=(1.0, 0.5), moe_expert_options=(1.0, 0.5),
                            moe_ffn_options=(1.0, 0.5))
    steps = (4, 4) if quick else (60, 40)
    train = TrainConfig(
        mesh=MeshConfig(),
        optim=OptimConfig(lr=3e-3, router_lr=1e-2, warmup_steps=2, schedule="cosine"),
        stages=(Stage("short", seq_len=32, batch_size=4, steps=steps[0]),
                Stage("long", seq_len=64, batch_size=4, steps=steps[1], budget_probs=(0.7, 0.3))),
        microbatches=2, vocab_chunk=48, checkpoint_every=2 if quick else 20, keep_checkpoints=2, seed=0)
    data = DataConfig(kind="synthetic", num_documents=64 if quick else 512, synthetic_vocab=128, seed=0)
    return DistillConfig(model=model, elastic=elastic, train=train, data=data, parent_seed=0)
