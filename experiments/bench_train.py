"""Training-step throughput on this machine (tokens/s, steady state after compile):

  elastic KD step  — router + Gumbel soft masks + masked student + frozen teacher + chunked KL
                     + budget loss (elastic_jax/train/step.py, mode "elastic");
  plain KD step    — the same parent-size student distilled without elasticity (mode "kd");
  transformers     — NemotronHForCausalLM (torch CPU) on the same config: forward with labels,
                     backward, AdamW step (a CE training step: HF has no KD step), if torch is
                     importable; else "skipped".

    python experiments/bench_train.py [--hidden 64] [--batch 4] [--seq 128] [--steps 5] [--json OUT]

Prints a table and a JSON object (also written to --json).
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import elastic_jax as ej
from elastic_jax.elastic.config import ElasticConfig
from elastic_jax.elastic.router import init_router
from elastic_jax.train.config import MeshConfig, OptimConfig
from elastic_jax.train.loop import compile_step, place_state, step_shardings
from elastic_jax.train.optim import make_optimizer
from elastic_jax.train.sharding import make_mesh
from elastic_jax.train.step import StepSpec


def model_config(hidden: int) -> ej.NemotronHConfig:
    return ej.NemotronHConfig(
        vocab_size=512, hidden_size=hidden, hybrid_override_pattern="M*-E", num_attention_heads=4,
        num_key_value_heads=2, head_dim=hidden // 4, intermediate_size=2 * hidden, mamba_num_heads=8,
        mamba_head_dim=hidden // 8, n_groups=2, ssm_state_size=16, chunk_size=32, n_routed_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=hidden // 2, moe_shared_expert_intermediate_size=hidden)


def bench_jax(mode: str, cfg, ecfg, batch: int, seq: int, steps: int) -> dict:
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    tx = make_optimizer(OptimConfig(lr=1e-4, router_lr=1e-2, warmup_steps=0), 1000)
    params = ej.init_params(cfg, jax.random.PRNGKey(0))
    router = init_router(cfg, ecfg, jax.random.PRNGKey(1)) if mode == "elastic" else {}
    spec = StepSpec(mode, cfg, cfg, ecfg if mode == "elastic" else None, 1.0, 8192, 1)
    state_like = {"params": params, "router": router,
                  "opt_state": jax.eval_shape(tx.init, {"params": params, "router": router})}
    state_sh, teacher_sh = step_shardings(spec, mesh, state_like, params)
    state = place_state(params, router, state_sh)
    state["opt_state"] = jax.jit(tx.init, out_shardings=state_sh["opt_state"])(
        {"params": state["params"], "router": state["router"]})
    fn, _ = compile_step(spec, tx, mesh, state_sh, teacher_sh, batch)
    rng = np.random.default_rng(0)
    b = {"tokens": jnp.asarray(rng.integers(3, cfg.vocab_size, (1, batch, seq)), jnp.int32),
         "segment_ids": jnp.ones((1, batch, seq), jnp.int32)}
    rep = NamedSharding(mesh, P())
    probs = jax.device_put(np.full((ecfg.n_budgets if mode == "elastic" else 1,),
                                   1.0 / (ecfg.n_budgets if mode == "elastic" else 1), np.float32), rep)
    args = lambda i: (params, b, jnp.int32(i), jnp.float32(0.5), jnp.float32(2.0), probs, jax.random.PRNGKey(0))
    t0 = time.perf_counter()
    state, m = fn(state, *args(0))
    jax.block_until_ready(m["loss"])
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(steps):
        state, m = fn(state, *args(i + 1))
    jax.block_until_ready(m["loss"])
    dt = (time.perf_counter() - t0) / steps
    return {"step_s": dt, "tokens_per_s": batch * seq / dt, "first_call_s": compile_s}


def bench_torch(cfg, batch: int, seq: int, steps: int) -> dict:
    try:
        import torch
        from transformers import NemotronHConfig, NemotronHForCausalLM
    except ImportError as e:
        return {"skipped": f"torch/transformers not importable ({e})"}
    torch.manual_seed(0)
    model = NemotronHForCausalLM(NemotronHConfig(**cfg.to_hf()))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(3, cfg.vocab_size, (batch, seq))

    def step():
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    dt = (time.perf_counter() - t0) / steps
    return {"step_s": dt, "tokens_per_s": batch * seq / dt, "first_call_s": first,
            "torch_threads": torch.get_num_threads()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    cfg = model_config(a.hidden)
    ecfg = ElasticConfig(budgets=(1.0, 0.75, 0.5), router_dim=32, hidden_options=(1.0, 0.75, 0.5),
                         mamba_options=(1.0, 0.5), ffn_options=(1.0, 0.75, 0.5), moe_expert_options=(1.0, 0.5),
                         moe_ffn_options=(1.0, 0.5))
    res = {"config": {"hidden": a.hidden, "pattern": cfg.pattern, "vocab": cfg.vocab_size, "batch": a.batch,
                      "seq": a.seq, "params": ej.count_params(ej.init_params(cfg, jax.random.PRNGKey(0))),
                      "backend": jax.default_backend()}}
    res["elastic_kd"] = bench_jax("elastic", cfg, ecfg, a.batch, a.seq, a.steps)
    res["plain_kd"] = bench_jax("kd", cfg, ecfg, a.batch, a.seq, a.steps)
    res["transformers_ce"] = bench_torch(cfg, a.batch, a.seq, a.steps)
    res["elastic_overhead"] = res["elastic_kd"]["step_s"] / res["plain_kd"]["step_s"]
    print(f"{'step':<22}{'tokens/s':>12}{'step (ms)':>12}{'first call (s)':>16}")
    for name in ("elastic_kd", "plain_kd", "transformers_ce"):
        r = res[name]
        if "skipped" in r:
            print(f"{name:<22}{'skipped':>12}   {r['skipped']}")
        else:
            print(f"{name:<22}{r['tokens_per_s']:>12,.0f}{1000 * r['step_s']:>12.1f}{r['first_call_s']:>16.1f}")
    print(f"elastic / plain KD step time: {res['elastic_overhead']:.2f}x")
    print(json.dumps(res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
