"""Soft-mode masking, ours vs the official code's (issue 14; METHOD §4.2-4.3).

    python experiments/soft_mask_forms.py [--out soft_mask_forms.json] [--steps 150] [--draws 16] [--seed 0]

Ours: the Mamba mask multiplies x after the conv + SiLU and z; the FFN mask multiplies relu²(h).
Official (Megatron --soft-mask): the Mamba mask multiplies z, x and dt at the in_proj output and the
conv-x weights and bias; the FFN mask multiplies h = W₁y *before* relu². For a hard (0/1) mask both
are exact (= the sliced layer); they differ only for a soft mixture m = Σ_i π_i prefix_i
(e.g. relu²(m·h) = m²·relu²(h) vs m·relu²(h)).

Both forms run the library's own layer functions (mamba_mixer / mlp_mixer); the official form is
expressed here by masking the projection / conv parameters (and no post-mask), which is what
`ElasticConfig(soft_mask_form="official")` computes (tests/test_soft_mask_form.py checks that). On one tiny Mamba block and
one tiny FFN block (random init, random inputs) it measures
  1. hard one-hot π: max |y_ours − y_official| per option (both must be exact);
  2. soft π (τ = 1, `draws` Gumbel draws): relative output difference, and the cosine / norm ratio of
     the router-logit gradient of the layer-distillation loss ‖y(π) − y_full‖²/‖y_full‖²;
  3. `steps` Adam steps of the router logits on distillation + budget loss (target 0.6 of the full
     width, official dead-zoned |d̄/(b·full) − 1|), τ 1 → 0.05 geometric: the chosen option, the
     expected width ratio and the distillation loss of the chosen hard width, per form.
Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

import elastic_jax as ej
from elastic_jax.model.kinds.mamba import MambaMasks, mamba_mixer
from elastic_jax.model.kinds.mlp import MLPMasks, mlp_mixer
from elastic_jax.model.layers import Context
from elastic_jax.widths import max_count, norm_correction, prefix_mask

CFG = ej.NemotronHConfig(hidden_size=32, hybrid_override_pattern="M-", vocab_size=64, intermediate_size=64,
                         mamba_num_heads=8, mamba_head_dim=4, n_groups=2, ssm_state_size=8)
H, P, I = CFG.mamba_num_heads, CFG.mamba_head_dim, CFG.intermediate_size
COUNTS = {"mamba": jnp.asarray([8, 6, 4]), "ffn": jnp.asarray([64, 48, 32])}
FULL = {"mamba": H, "ffn": I}
TARGET, DEAD_ZONE = 0.6, 0.05
CTX = Context()


def mamba_out(p, x, probs, form):
    c = COUNTS["mamba"]
    head = prefix_mask(H, c, probs, CFG.n_groups)
    eps_f, scale = norm_correction(H, c, probs)
    active = max_count(c, probs) // CFG.n_groups
    if form == "ours":
        el = MambaMasks(head_mask=head, norm_eps=eps_f, norm_scale=scale, active_heads=active)
        return mamba_mixer(p, x, CFG, el, CTX, None)[0]
    hm = jnp.repeat(head, P)          # official: z, x, dt at the in_proj output; conv-x weight and bias
    q = dict(p, z_proj=p["z_proj"] * hm, x_proj=p["x_proj"] * hm, dt_proj=p["dt_proj"] * head,
             conv_x=p["conv_x"] * hm, conv_x_bias=p["conv_x_bias"] * hm)
    el = MambaMasks(head_mask=jnp.ones((H,)), norm_eps=eps_f, norm_scale=scale, active_heads=active)
    return mamba_mixer(q, x, CFG, el, CTX, None)[0]


def ffn_out(p, x, probs, form):
    m = prefix_mask(I, COUNTS["ffn"], probs)
    if form == "ours":
        return mlp_mixer(p, x, CFG, MLPMasks(ffn_mask=m), CTX, None)[0]
    return mlp_mixer(dict(p, up_proj=p["up_proj"] * m), x, CFG, None, CTX, None)[0]   # mask before relu²


BLOCKS = {"mamba": mamba_out, "ffn": ffn_out}


def distill(fn, p, x, probs, form, y_full):
    y = fn(p, x, probs, form)
    return jnp.sum((y - y_full) ** 2) / jnp.sum(y_full ** 2)


def budget(name, probs):
    d = jnp.sum(probs * COUNTS[name]) / (TARGET * FULL[name])
    diff = jnp.abs(d - 1.0)
    return jnp.where(diff >= DEAD_ZONE, diff, 0.0)


def pi(z, key, tau):
    g = 0.0 if key is None else jax.random.gumbel(key, z.shape)
    return jax.nn.softmax((z + g) / tau)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="soft_mask_forms.json")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--draws", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0, help="model init, inputs and Gumbel draws")
    args = ap.parse_args()
    S = 100000 * args.seed
    params = ej.init_params(CFG, jax.random.PRNGKey(args.seed))
    blocks = {"mamba": params["layers"][0]["mixer"], "ffn": params["layers"][1]["mixer"]}
    x = jax.random.normal(jax.random.PRNGKey(S + 1), (4, 16, CFG.hidden_size))
    res = {}
    for name, fn in BLOCKS.items():
        p = blocks[name]
        n = len(COUNTS[name])
        y_full = fn(p, x, jax.nn.one_hot(0, n), "ours")
        r = {}
        # 1. hard masks: both forms exact
        r["hard_max_abs_diff"] = max(float(jnp.max(jnp.abs(fn(p, x, jax.nn.one_hot(i, n), "ours")
                                                           - fn(p, x, jax.nn.one_hot(i, n), "official"))))
                                     for i in range(n))
        # 2. soft masks at τ = 1: output difference and router-gradient agreement
        z0 = jnp.zeros((n,))
        grads = {f: jax.jit(jax.grad(lambda z, k, f=f: distill(fn, p, x, pi(z, k, 1.0), f, y_full))) for f in
                 ("ours", "official")}
        cos, ratio, rel = [], [], []
        for d in range(args.draws):
            k = jax.random.PRNGKey(S + 100 + d)
            probs = pi(z0, k, 1.0)
            yo, yf = fn(p, x, probs, "ours"), fn(p, x, probs, "official")
            rel.append(float(jnp.linalg.norm(yo - yf) / jnp.linalg.norm(yo)))
            go, gf = grads["ours"](z0, k), grads["official"](z0, k)
            cos.append(float(jnp.dot(go, gf) / (jnp.linalg.norm(go) * jnp.linalg.norm(gf) + 1e-30)))
            ratio.append(float(jnp.linalg.norm(gf) / (jnp.linalg.norm(go) + 1e-30)))
        r["soft_rel_output_diff_median"] = float(np.median(rel))
        r["soft_grad_cosine_median"] = float(np.median(cos))
        r["soft_grad_cosine_min"] = float(np.min(cos))
        r["soft_grad_norm_ratio_official_over_ours_median"] = float(np.median(ratio))
        # 3. router-only training on distillation + budget, per form
        for form in ("ours", "official"):
            tx = optax.adam(0.05)

            def loss(z, k, tau, form=form):
                probs = pi(z, k, tau)
                return distill(fn, p, x, probs, form, y_full) + budget(name, probs)

            @jax.jit
            def step(z, s, k, tau):
                l, g = jax.value_and_grad(loss)(z, k, tau)
                u, s = tx.update(g, s)
                return optax.apply_updates(z, u), s, l

            z, s = z0, tx.init(z0)
            for t in range(args.steps):
                tau = 1.0 * (0.05 / 1.0) ** (t / max(args.steps - 1, 1))
                z, s, _ = step(z, s, jax.random.PRNGKey(S + 1000 + t), tau)
            choice = int(jnp.argmax(z))
            probs = pi(z, None, 0.05)
            r[f"{form}_choice_count"] = int(COUNTS[name][choice])
            r[f"{form}_expected_ratio"] = float(jnp.sum(probs * COUNTS[name]) / FULL[name])
            r[f"{form}_hard_distill"] = float(distill(fn, p, x, jax.nn.one_hot(choice, n), "ours", y_full))
        res[name] = r
    keys = list(next(iter(res.values())))
    print(f"{'metric':48s} " + " ".join(f"{b:>12s}" for b in res))
    for k in keys:
        print(f"{k:48s} " + " ".join(f"{res[b][k]:12.4g}" for b in res))
    with open(args.out, "w") as f:
        json.dump({"steps": args.steps, "draws": args.draws, "seed": args.seed, "target": TARGET, "blocks": res}, f,
                  indent=1)


if __name__ == "__main__":
    main()
