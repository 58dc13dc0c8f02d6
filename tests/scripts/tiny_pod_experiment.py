"""A tiny PodExperiment for the simulated-pod tests (tests/test_pod_multihost.py): the hybrid
pattern of the paper runs at toy widths, two curriculum stages, a 70/30 data mix of two synthetic
sources, one 8-device CPU target (fsdp=8) that 1 process x 8 devices and 2 processes x 4 devices
both match. The HF parent folder comes from TINY_POD_PARENT (the test writes it with save_hf);
TINY_POD_STEPS="A,B" sets the two stages' step counts."""
import os

from elastic_jax import NemotronHConfig
from elastic_jax.data import DataConfig
from elastic_jax.elastic import ElasticConfig
from elastic_jax.model.policy import ComputePolicy
from elastic_jax.pod import DataMix, PodExperiment, Target
from elastic_jax.train import MeshConfig, OptimConfig, Stage, TrainConfig

MODEL = NemotronHConfig(vocab_size=64, hidden_size=32, hybrid_override_pattern="MEM*", num_attention_heads=4,
                        num_key_value_heads=2, head_dim=8, intermediate_size=48, mamba_num_heads=4, mamba_head_dim=8,
                        n_groups=2, ssm_state_size=8, chunk_size=8, n_routed_experts=4, num_experts_per_tok=2,
                        moe_intermediate_size=16, moe_shared_expert_intermediate_size=16)


def config(quick: bool = False) -> PodExperiment:
    a, b = (int(x) for x in os.environ.get("TINY_POD_STEPS", "3,6").split(","))
    elastic = ElasticConfig(budgets=(1.0, 0.5), mamba_options=(1.0, 0.5), moe_expert_options=(1.0, 0.5),
                            ffn_options=None, router_dim=8)
    train = TrainConfig(
        optim=OptimConfig(lr=1e-3, router_lr=1e-2, warmup_steps=1),
        stages=(Stage("short", seq_len=16, batch_size=16, steps=a),
                Stage("long", seq_len=32, batch_size=8, steps=b, budget_probs=(0.7, 0.3))),
        microbatches=2, vocab_chunk=64, checkpoint_every=100, keep_checkpoints=3, log_every=1,
        tensorboard=False, plot=False,
        policy=ComputePolicy(compute_dtype="float32", kernel_impl="xla", attention_impl="xla"))
    syn = lambda seed: DataConfig(kind="synthetic", num_documents=96, synthetic_vocab=64, seed=seed,
                                  synthetic_len=(6, 40))
    return PodExperiment(name="tiny_pod", model=MODEL, elastic=elastic, train=train,
                         targets=(Target("cpu8", "cpu", devices=8, mesh=MeshConfig(fsdp=8)),
                                  Target("cpu1", "cpu", devices=1, mesh=MeshConfig(fsdp=1))),
                         data=DataMix(reasoning=syn(1), pretraining=syn(2), reasoning_ratio=0.7),
                         parent_hf=os.environ.get("TINY_POD_PARENT"), teacher_dtype="float32",
                         calibration_batches=2, calibration_batch_size=4)
