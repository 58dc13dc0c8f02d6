"""KD gradient reaching every router head, soft vs hard (straight-through) samples (issue 14).

    python experiments/router_grads.py [--out router_grads.json] [--draws 8]

A tiny MoE model (pattern ME*-E, every elastic axis incl. depth and Mamba channels, heterogeneous
routing), an MSE-to-random-targets student loss, budget 0.6; for each of `draws` Gumbel keys the
Σ|∂L/∂W2| of every router head in soft and in hard mode. Prints the median per head and writes JSON.
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

import elastic_jax as ej
from elastic_jax.elastic import router as R
from elastic_jax.elastic.config import ElasticConfig

CFG = ej.NemotronHConfig(hidden_size=32, hybrid_override_pattern="ME*-E", vocab_size=64, n_routed_experts=16,
                         num_experts_per_tok=2, moe_intermediate_size=32, moe_shared_expert_intermediate_size=16,
                         mamba_num_heads=8, mamba_head_dim=4, n_groups=2, ssm_state_size=8, intermediate_size=32)
ECFG = ElasticConfig(budgets=(1.0, 0.6), hidden_options=(1.0, 0.5), mamba_options=(1.0, 0.5),
                     mamba_channel_options=(1.0, 0.5), ffn_options=(1.0, 0.5), moe_expert_options=(1.0, 0.5),
                     moe_ffn_options=(1.0, 0.5), depth_options=(5, 4), layer_ranking=(0, 1, 3, 2, 4),
                     heterogeneous=True, router_dim=16)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="router_grads.json")
    ap.add_argument("--draws", type=int, default=8)
    a = ap.parse_args()
    params = ej.init_params(CFG, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 8), 0, CFG.vocab_size)
    target = jax.random.normal(jax.random.PRNGKey(4), (2, 8, CFG.vocab_size))
    rp = R.init_router(CFG, ECFG, jax.random.PRNGKey(1))
    code = R.budget_code_from_index(ECFG, 1)

    def loss(rp, key, hard):
        out = R.route(rp, CFG, ECFG, code, key, 1.0, 1.0, hard=hard)
        return jnp.mean(jnp.square(ej.forward(params, tokens, CFG, out.soft_widths) - target))

    grad = jax.jit(jax.grad(loss), static_argnums=2)
    res = {m: {h: [] for h in rp} for m in ("soft", "hard")}
    for d in range(a.draws):
        for mode in ("soft", "hard"):
            g = grad(rp, jax.random.PRNGKey(d), mode == "hard")
            for h in rp:
                res[mode][h].append(float(jnp.abs(g[h]["w2"]).sum()))
    print(f"{'head':16s} {'soft (median)':>14s} {'hard (median)':>14s} {'hard min':>10s}")
    for h in sorted(rp):
        print(f"{h:16s} {np.median(res['soft'][h]):14.2e} {np.median(res['hard'][h]):14.2e} "
              f"{np.min(res['hard'][h]):10.2e}")
    with open(a.out, "w") as f:
        json.dump({"draws": a.draws, "grad_abs_sum": res}, f, indent=1)


if __name__ == "__main__":
    main()
