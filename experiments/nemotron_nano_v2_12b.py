"""Nemotron Elastic as the paper ran it: Nemotron Nano v2 12B -> nested 9B and 6B in one elastic
distillation run (METHOD §7).

    elastic-jax plan experiments/nemotron_nano_v2_12b.py --topology v5p:4x4x8 --json    # compile, fit, cost
    elastic-jax plan experiments/nemotron_nano_v2_12b.py --target h100x8                  # 8x H100: lower only
    elastic-jax run experiments/nemotron_nano_v2_12b.py --set parent_hf=/ckpt/nano-v2-12b \\
        --set checkpoint_dir=/mnt/shared/nano-v2-elastic

Parent: the architecture fields of `nvidia/NVIDIA-Nemotron-Nano-12B-v2/config.json` (62 layers: 28
Mamba-2, 28 relu² MLP, 6 attention; 12.3B parameters). Budgets 1.0 / 0.75 / 0.5 of the parameters
(12B / 9B / 6B). Curriculum: stage 1 at 8K context, batch 1536, ~65B tokens, uniform budgets; stage
2 at 49K, batch 512, ~45B tokens, p = 0.5 / 0.3 / 0.2; model LR 9e-5, router LR 1e-2, 60 warmup
steps. Axes: embedding, Mamba heads, FFN width (Nemotron Elastic also routes attention heads and
depth; depth was ablated and is left out here).
"""
from elastic_jax import NemotronHConfig
from elastic_jax.data import DataConfig
from elastic_jax.elastic import ElasticConfig
from elastic_jax.model.policy import ComputePolicy
from elastic_jax.pod import DataMix, PodExperiment, Target
from elastic_jax.train import MeshConfig, OptimConfig, Stage, TrainConfig

# config.json of nvidia/NVIDIA-Nemotron-Nano-12B-v2 (the architecture fields)
HF_CONFIG = {
    "model_type": "nemotron_h", "vocab_size": 131072, "hidden_size": 5120, "num_hidden_layers": 62,
    "hybrid_override_pattern": "M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-",
    "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 20480,
    "mamba_num_heads": 128, "mamba_head_dim": 80, "n_groups": 8, "ssm_state_size": 128, "conv_kernel": 4,
    "chunk_size": 128, "expand": 2, "layer_norm_epsilon": 1e-5, "tie_word_embeddings": False,
    "time_step_min": 0.001, "time_step_max": 0.1, "time_step_floor": 0.0001, "max_position_embeddings": 131072,
}
EIGHTHS = (1.0, 0.875, 0.75, 0.625, 0.5)


def config(quick: bool = False) -> PodExperiment:
    model = NemotronHConfig.from_hf(HF_CONFIG)
    elastic = ElasticConfig(
        budgets=(1.0, 0.75, 0.5), budget_target="total",
        hidden_options=EIGHTHS[:4], mamba_options=EIGHTHS, ffn_options=EIGHTHS,
        moe_expert_options=None, moe_ffn_options=None, router_dim=256,
        tau_start=1.0, tau_end=0.05, scale_start=1.0, scale_end=10.0)
    train = TrainConfig(
        optim=OptimConfig(lr=9e-5, router_lr=1e-2, warmup_steps=60, schedule="cosine", b1=0.9, b2=0.98, clip_norm=1.0),
        stages=(Stage("short", seq_len=8192, batch_size=1536, tokens=65e9),
                Stage("long", seq_len=49152, batch_size=512, tokens=45e9, budget_probs=(0.5, 0.3, 0.2),
                      min_doc_len=8193)),
        microbatches=4, vocab_chunk=8192, checkpoint_every=200, keep_checkpoints=3, log_every=10,
        policy=ComputePolicy(compute_dtype="bfloat16", kernel_impl="xla", attention_impl="auto", remat="full",
                             scan_layers=True))
    targets = (
        # a 4-way tensor axis splits each sequence's Mamba / MLP / attention activations over 4 chips:
        # with every chip on fsdp one 49K sequence per chip needs 113.8 GiB of 95 (BUILD_NOTES, issue 12)
        Target("v5p-256", "tpu", topology="v5p:4x4x8", mesh=MeshConfig(fsdp=32, tensor=4), microbatches=16),
        # the same per-chip split on one 8-GPU node (2 sequences of 49K per micro-batch)
        Target("h100x8", "gpu", devices=8, chip="h100", mesh=MeshConfig(fsdp=2, tensor=4), microbatches=256),
        Target("h200x8", "gpu", devices=8, chip="h200", mesh=MeshConfig(fsdp=2, tensor=4), microbatches=256),
    )
    # token shards from `elastic-jax tokenize ... --tokenizer <parent_hf> --out ...` (README: "Prepare your
    # data"), streamed by every host; the run checks them against the parent's tokenizer.json; eos_id 2
    # (NemotronH "</s>") ends every text document; 70% of the tokens from reasoning traces
    data = DataMix(reasoning=DataConfig(kind="shards", path="data/tokens/reasoning", eos_id=2, read_threads=16),
                   pretraining=DataConfig(kind="shards", path="data/tokens/pretraining", eos_id=2),
                   reasoning_ratio=0.7)
    return PodExperiment(
        name="nemotron_nano_v2_12b", model=model, elastic=elastic, train=train, targets=targets, data=data,
        parent_hf="checkpoints/NVIDIA-Nemotron-Nano-12B-v2", checkpoint_dir=None,
        published={"parent": (12.3e9, 12.3e9), 0.75: (9e9, 9e9), 0.5: (6e9, 6e9)})
