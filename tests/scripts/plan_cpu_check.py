"""Helper for tests/test_plan.py, in its own process (the device count is fixed when jax starts):
on 8 host CPU devices, `elastic-jax plan` of the shrunken 30B-A3B file (a real XLA:CPU compile)
and of the shrunken 12B one (GPU: lowered and sharded only), then the pod runner (`elastic-jax
run` of a tiny PodExperiment from an HF parent: train, then rerun and resume). Writes the JSON of
every result to argv[1]; argv[2]: a scratch folder for the runner."""
import contextlib
import io
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SHRUNK = os.path.join(HERE, "shrunk_pod_experiment.py")
XP = {"nano3": os.path.join(ROOT, "experiments", "nemotron3_nano_30b_a3b.py"),
      "nano2": os.path.join(ROOT, "experiments", "nemotron_nano_v2_12b.py")}
RUNS = {   # name: (experiment, plan arguments)
    "nano3_cpu": ("nano3", ["--platform", "cpu", "--devices", "8", "--stage", "short"]),
    "nano2_gpu": ("nano2", ["--platform", "gpu", "--devices", "8", "--chip", "h200"]),
}


def pod_runner(tmp: str) -> dict:
    """`run_experiment` of a tiny PodExperiment on this job's devices: the parent read from its HF
    folder onto the mesh, importance + permutation, the data mix, training; then a rerun resumes."""
    import jax

    import elastic_jax as ej
    from elastic_jax.data import DataConfig
    from elastic_jax.elastic import ElasticConfig
    from elastic_jax.experiment import run_experiment
    from elastic_jax.pod import DataMix, PodExperiment, Target
    from elastic_jax.train import OptimConfig, Stage, TrainConfig

    cfg = ej.NemotronHConfig(vocab_size=64, hidden_size=32, hybrid_override_pattern="M*E", num_attention_heads=2,
                             num_key_value_heads=1, head_dim=16, mamba_num_heads=4, mamba_head_dim=8, n_groups=1,
                             ssm_state_size=8, chunk_size=16, n_routed_experts=4, num_experts_per_tok=2,
                             moe_intermediate_size=16, moe_shared_expert_intermediate_size=16)
    ej.save_hf(os.path.join(tmp, "parent"), cfg, ej.init_params(cfg, jax.random.PRNGKey(0)))
    n = jax.device_count()
    syn = lambda seed: DataConfig(kind="synthetic", num_documents=64, synthetic_vocab=64, seed=seed)
    xp = PodExperiment(
        name="tiny", model=cfg, elastic=ElasticConfig(budgets=(1.0, 0.5), router_dim=8, hidden_options=(1.0, 0.5),
                                                      mamba_options=None, moe_expert_options=(1.0, 0.5),
                                                      moe_ffn_options=None, ffn_options=None),
        train=TrainConfig(optim=OptimConfig(lr=1e-3), stages=(Stage("short", seq_len=32, batch_size=n, steps=2),),
                          checkpoint_every=1000, keep_checkpoints=1, async_checkpointing=False, tensorboard=False,
                          plot=False, vocab_chunk=None),
        targets=(Target("here", "cpu", devices=n),), data=DataMix(syn(0), syn(1), 0.7),
        parent_hf=os.path.join(tmp, "parent"), calibration_batches=1, calibration_batch_size=4)
    run = os.path.join(tmp, "run")
    run_experiment(xp, run)
    with open(os.path.join(run, "result.json")) as f:
        first = json.load(f)
    run_experiment(xp, run)
    with open(os.path.join(run, "result.json")) as f:
        again = json.load(f)
    return {"devices": n, "first": first, "again": again}


def main(out_path: str, tmp: str) -> int:
    from elastic_jax.cli import main as cli
    results = {}
    for name, (xp, args) in RUNS.items():
        os.environ["SHRUNK_SOURCE"] = XP[xp]
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = cli(["plan", SHRUNK, "--json", *args])
        results[name] = {"rc": rc, "plan": json.loads(buf.getvalue()) if rc == 0 else None}
    results["pod_runner"] = pod_runner(tmp)
    with open(out_path, "w") as f:
        json.dump(results, f, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
