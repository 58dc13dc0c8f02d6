"""Star Elastic as the paper ran it: Nemotron 3 Nano 30B-A3B -> nested 23B (2.8B active) and 12B
(2.0B active) in one elastic distillation run (METHOD §7).

    elastic-jax plan experiments/nemotron3_nano_30b_a3b.py --topology v5p:4x4x8 --json   # compile, fit, cost
    elastic-jax plan experiments/nemotron3_nano_30b_a3b.py --target h100x8 --stage long  # 8x H100: lower only
    elastic-jax run experiments/nemotron3_nano_30b_a3b.py --set parent_hf=/ckpt/nano3 \\
        --set checkpoint_dir=/mnt/shared/nano3-elastic          # on the pod (README: Running on a TPU pod)

Parent: the architecture fields of `nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16/config.json` (31.6B
parameters, ~3.2B active, 3.6B with embeddings). Curriculum: ~100B tokens at 8K context with
uniform budget sampling, then ~60B at 49K with p = 0.5 / 0.3 / 0.2 (full / 23B / 12B); AdamW, model
LR 1e-4, router LR 1e-2. Budgets are active-parameter fractions (3.6B -> 2.8B -> 2.0B) with a
second term on total parameters (31.6B -> 23B -> 12B). Batch sizes are not published: the Nemotron
Elastic ones (1536 x 8K, 512 x 49K) are used. Data: 70% reasoning / 30% pretraining text (the
paper's best mix), token shards written by `elastic-jax tokenize` (paths: --set data.reasoning.path=...).
"""
from elastic_jax import NemotronHConfig
from elastic_jax.data import DataConfig
from elastic_jax.elastic import BudgetTarget, ElasticConfig
from elastic_jax.model.policy import ComputePolicy
from elastic_jax.pod import DataMix, PodExperiment, Target
from elastic_jax.train import MeshConfig, OptimConfig, Stage, TrainConfig

# config.json of nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16 (the architecture fields)
HF_CONFIG = {
    "model_type": "nemotron_h", "vocab_size": 131072, "hidden_size": 2688, "num_hidden_layers": 52,
    "hybrid_override_pattern": "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME",
    "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 128, "intermediate_size": 1856,
    "mamba_num_heads": 64, "mamba_head_dim": 64, "n_groups": 8, "ssm_state_size": 128, "conv_kernel": 4,
    "chunk_size": 128, "expand": 2, "n_routed_experts": 128, "num_experts_per_tok": 6, "moe_intermediate_size": 1856,
    "moe_shared_expert_intermediate_size": 3712, "n_group": 1, "topk_group": 1, "norm_topk_prob": True,
    "routed_scaling_factor": 2.5, "layer_norm_epsilon": 1e-5, "tie_word_embeddings": False,
    "time_step_min": 0.001, "time_step_max": 0.1, "time_step_floor": 0.0001, "max_position_embeddings": 262144,
}
EIGHTHS = (1.0, 0.875, 0.75, 0.625, 0.5)


def config(quick: bool = False) -> PodExperiment:
    model = NemotronHConfig.from_hf(HF_CONFIG)
    elastic = ElasticConfig(
        budgets=(1.0, 0.78, 0.56), budget_target="active",
        budget_targets=(BudgetTarget("active", (1.0, 0.78, 0.56)), BudgetTarget("total", (1.0, 0.728, 0.38))),
        # Star Elastic's axes: embedding, Mamba heads, routed experts, expert width (no attention heads)
        hidden_options=EIGHTHS[:4], mamba_options=EIGHTHS, moe_expert_options=EIGHTHS, moe_ffn_options=EIGHTHS,
        ffn_options=None, router_dim=256, tau_start=1.0, tau_end=0.05, scale_start=1.0, scale_end=10.0)
    train = TrainConfig(
        optim=OptimConfig(lr=1e-4, router_lr=1e-2, warmup_steps=60, schedule="cosine", b1=0.9, b2=0.98, clip_norm=1.0),
        stages=(Stage("short", seq_len=8192, batch_size=1536, tokens=100e9),
                Stage("long", seq_len=49152, batch_size=512, tokens=60e9, budget_probs=(0.5, 0.3, 0.2),
                      min_doc_len=8193)),
        microbatches=4, vocab_chunk=8192, checkpoint_every=200, keep_checkpoints=3, log_every=10,
        policy=ComputePolicy(compute_dtype="bfloat16", kernel_impl="xla", attention_impl="auto", remat="full",
                             scan_layers=True, moe_token_chunk=8192))
    targets = (
        Target("v5p-256", "tpu", topology="v5p:4x4x8", mesh=MeshConfig(fsdp=128)),
        Target("h100x8", "gpu", devices=8, chip="h100", mesh=MeshConfig(fsdp=8), microbatches=64),
        Target("h200x8", "gpu", devices=8, chip="h200", mesh=MeshConfig(fsdp=8), microbatches=64),
    )
    # token shards from `elastic-jax tokenize ... --tokenizer <parent_hf> --out ...` (README: "Prepare your
    # data"), streamed by every host; the run checks them against the parent's tokenizer.json; eos_id 2
    # (NemotronH "</s>") ends every text document; 70% of the tokens from reasoning traces
    data = DataMix(reasoning=DataConfig(kind="shards", path="data/tokens/reasoning", eos_id=2, read_threads=16),
                   pretraining=DataConfig(kind="shards", path="data/tokens/pretraining", eos_id=2),
                   reasoning_ratio=0.7)
    return PodExperiment(
        name="nemotron3_nano_30b_a3b", model=model, elastic=elastic, train=train, targets=targets, data=data,
        parent_hf="checkpoints/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16", checkpoint_dir=None,
        published={"parent": (31.6e9, 3.6e9), 0.78: (23e9, 2.8e9), 0.56: (12e9, 2.0e9)})
