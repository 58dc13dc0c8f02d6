"""Helper for tests/test_mesh_model.py (own process: 8 fake CPU devices fixed at jax import).

The model under `jax.set_mesh` (expert-parallel MoE, activation constraints, per-shard kernels)
against the same model without a mesh (one device): logits and parameter gradients, full and
masked widths, several mesh shapes and rules; the SSD / gmm kernels per shard against the
unsharded call, with the compiled HLO checked for an all-gather of the full operand.
Writes a JSON of max errors and HLO facts to argv[1].
"""
import json
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.extend.core as jex_core  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import elastic_jax as ej  # noqa: E402
from elastic_jax import kernels, sharding as shd  # noqa: E402
from elastic_jax.train.config import MeshConfig  # noqa: E402
from elastic_jax.train.sharding import make_mesh  # noqa: E402

CFG = ej.NemotronHConfig(vocab_size=64, hidden_size=32, hybrid_override_pattern="ME*E", num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, intermediate_size=32, mamba_num_heads=4,
                         mamba_head_dim=8, n_groups=2, ssm_state_size=8, chunk_size=8, n_routed_experts=8,
                         n_group=2, topk_group=1, num_experts_per_tok=2, moe_intermediate_size=16,
                         moe_shared_expert_intermediate_size=16, routed_scaling_factor=2.5)
B, L = 8, 8


def params_and_data():
    params = ej.init_params(CFG, jax.random.PRNGKey(0))
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape) if x.ndim == 1 else x for x, k in zip(leaves, keys)]
    params = jax.tree_util.tree_unflatten(tree, leaves)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (B, L), 0, CFG.vocab_size)
    seg = jnp.ones((B, L), jnp.int32).at[:, L // 2:].set(2).at[0, -2:].set(0)
    probe = jax.random.normal(jax.random.PRNGKey(3), (B, L, CFG.vocab_size))
    return params, tokens, seg, probe


def loss_fn(params, tokens, seg, probe, widths, impl):
    """impl: a kernel impl, "+scan" appended = the layers under lax.scan with full remat."""
    policy = ej.ComputePolicy(kernel_impl=impl.split("+")[0], scan_layers=impl.endswith("+scan"),
                              remat="full" if impl.endswith("+scan") else "none")
    logits = ej.forward(params, tokens, CFG, widths, segment_ids=seg, policy=policy)
    return jnp.sum(logits * probe), logits


def run(params, tokens, seg, probe, widths, impl, mesh=None, rules=shd.DEFAULT_RULES):
    f = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), static_argnums=(5,))
    if mesh is None:
        (_, logits), g = f(params, tokens, seg, probe, widths, impl)
        return logits, g
    psh = shd.tree_shardings(ej.param_axes(CFG), params, mesh, rules)
    bsh = NamedSharding(mesh, shd.batch_spec(mesh, B, rules))
    args = (jax.device_put(params, psh), jax.device_put(tokens, bsh), jax.device_put(seg, bsh),
            jax.device_put(probe, NamedSharding(mesh, P())), widths)
    with jax.set_mesh(mesh), shd.use_rules(rules):
        compiled = f.lower(*args, impl).compile()
        (_, logits), g = compiled(*args)
    return logits, g, compiled.as_text()


def max_err(a, b):
    """Largest |a - b| over all leaves, relative to max(1, largest |b|)."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    scale = max(1.0, max(float(jnp.max(jnp.abs(y))) for y in lb))
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(la, lb)) / scale


def model_checks(out):
    params, tokens, seg, probe = params_and_data()
    masked = ej.Widths(hidden=24, mamba_heads=2, attn_heads=2, moe_experts=4, moe_ffn=8).resolve(CFG)
    # (name, mesh shape, rules, kernel impl, widths); FULL_MATRIX=1 runs every mesh at both widths
    meshes = [("expert=8", (1, 1, 1, 8), shd.DEFAULT_RULES, "xla", ("full", "masked")),
              ("data=2,expert=4", (2, 1, 1, 4), shd.DEFAULT_RULES, "xla", ("masked",)),
              ("fsdp=2,tensor=2,expert=2", (1, 2, 2, 2), shd.DEFAULT_RULES, "xla", ("masked",)),
              ("data=4,tensor=2 (no expert axis)", (4, 1, 2, 1), shd.DEFAULT_RULES, "xla", ("full",)),
              # tokens not split over the expert axis: local experts + psum
              ("data=2,expert=4, batch->data", (2, 1, 1, 4), shd.merge_rules([("batch", "data")]), "xla",
               ("masked",)),
              ("data=2,expert=2,tensor=2 pallas", (2, 1, 2, 2), shd.DEFAULT_RULES, "pallas", ("masked",)),
              # scanned layers (part C): the EP MoE and the block-boundary constraints inside the scan
              ("expert=8 scan", (1, 1, 1, 8), shd.DEFAULT_RULES, "xla+scan", ("masked",))]
    ref = {}
    for name, shape, rules, impl, which in meshes:
        mesh = make_mesh(MeshConfig(*shape))
        for wname, widths in (("full", None), ("masked", masked)):
            if wname not in which and not os.environ.get("FULL_MATRIX"):
                continue
            if (wname, impl) not in ref:
                ref[(wname, impl)] = run(params, tokens, seg, probe, widths, impl)
            logits, g, hlo = run(params, tokens, seg, probe, widths, impl, mesh, rules)
            r_logits, r_g = ref[(wname, impl)]
            out["model"].append({"mesh": name, "widths": wname, "impl": impl,
                                 "logits_err": max_err(logits, r_logits), "grad_err": max_err(g, r_g),
                                 "all_to_all": hlo.count("all-to-all"), "while": hlo.count(" while(")})
            print(out["model"][-1], flush=True)


def kernel_checks(out):
    """kernels.ssd / kernels.gmm with `partition=` under a mesh == the unsharded call."""
    mesh = make_mesh(MeshConfig(2, 1, 2, 2))
    k = jax.random.split(jax.random.PRNGKey(5), 8)
    b, l, h, pd, g, n = 4, 16, 4, 8, 2, 8
    x = jax.random.normal(k[0], (b, l, h, pd))
    dt = jax.nn.softplus(jax.random.normal(k[1], (b, l, h)))
    A = -jnp.exp(jax.random.normal(k[2], (h,)))
    Bm = jax.random.normal(k[3], (b, l, g, n))
    Cm = jax.random.normal(k[4], (b, l, g, n))
    Dv = jax.random.normal(k[5], (h,))
    for impl in ("xla", "pallas"):
        def ssd_loss(x, dt, Bm, Cm, part):
            y, s = kernels.ssd(x, dt, A, Bm, Cm, Dv, chunk_size=8, impl=impl, partition=part)
            return jnp.sum(y ** 2) + jnp.sum(s), (y, s)
        f = jax.jit(jax.value_and_grad(ssd_loss, argnums=(0, 1, 2, 3), has_aux=True), static_argnums=(4,))
        (_, ref), gref = f(x, dt, Bm, Cm, None)
        part = (("data", "expert"), ("tensor",))
        sh = lambda *s: NamedSharding(mesh, P(*s))
        args = (jax.device_put(x, sh(("data", "expert"), None, "tensor", None)),
                jax.device_put(dt, sh(("data", "expert"), None, "tensor")),
                jax.device_put(Bm, sh(("data", "expert"), None, "tensor", None)),
                jax.device_put(Cm, sh(("data", "expert"), None, "tensor", None)))
        with jax.set_mesh(mesh):
            (_, got), ggot = f(*args, part)
            hlo = f.lower(*args, part).compile().as_text()
        out["kernels"].append({"kernel": "ssd", "impl": impl, "err": max_err(got, ref), "grad_err": max_err(ggot, gref),
                               "all_gather": hlo.count("all-gather")})
        print(out["kernels"][-1], flush=True)

        # gmm: rows split over (data, expert), the output columns over tensor
        m, kd, nd, G = 64, 16, 32, 4
        lhs = jax.random.normal(k[6], (m, kd))
        rhs = jax.random.normal(k[7], (G, kd, nd))
        gs = jnp.array([10, 0, 30, 20], jnp.int32)       # sum 60 < m: tail rows are zero

        def gmm_loss(lhs, rhs, part):
            o = kernels.gmm(lhs, rhs, gs, active_n=24, impl=impl, preferred_element_type=jnp.float32,
                            partition=part)
            return jnp.sum(o ** 2), o
        f = jax.jit(jax.value_and_grad(gmm_loss, argnums=(0, 1), has_aux=True), static_argnums=(2,))
        (_, ref), gref = f(lhs, rhs, None)
        part = (("data", "expert"), ("tensor",))
        args = (jax.device_put(lhs, sh(("data", "expert"), None)), jax.device_put(rhs, sh(None, None, "tensor")))
        with jax.set_mesh(mesh):
            (_, got), ggot = f(*args, part)
            hlo = f.lower(*args, part).compile().as_text()
        out["kernels"].append({"kernel": "gmm", "impl": impl, "err": max_err(got, ref), "grad_err": max_err(ggot, gref),
                               "all_gather": hlo.count("all-gather")})
        print(out["kernels"][-1], flush=True)


def quant_checks(out):
    """Fake-quantized experts (QWeight, elastic_jax.quant) through the expert-parallel MoE: output
    within FP8 rounding flips of one device, calibration amaxes equal."""
    from elastic_jax.model.layers import Context, moe_mixer
    from elastic_jax.quant.qweight import QWeight
    p = ej.init_params(CFG, jax.random.PRNGKey(0))["layers"][3]["mixer"]
    x = jax.random.normal(jax.random.PRNGKey(1), (B, L, CFG.hidden_size))

    def quantized(observe=None):
        return dict(p, up_proj=QWeight(p["up_proj"], jnp.float32(0.01), observe),
                    down_proj=QWeight(p["down_proj"], jnp.float32(0.002), observe))

    def amaxes(x):
        seen = []
        moe_mixer(quantized(lambda v: seen.append(jnp.max(jnp.abs(v.astype(jnp.float32))))), x, CFG, None,
                  Context(), None)
        return jnp.stack(seen)
    fwd = jax.jit(lambda q, x: moe_mixer(q, x, CFG, None, Context(), None)[0])
    ref, ref_amax = fwd(quantized(), x), jax.jit(amaxes)(x)
    with jax.set_mesh(make_mesh(MeshConfig(1, 2, 2, 2))):
        got, got_amax = fwd(quantized(), x), jax.jit(amaxes)(x)
    out["quant"] = {"err": float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref))),
                    "amax_err": max_err(got_amax, ref_amax)}
    print(out["quant"], flush=True)


def scan_lengths(jaxpr):
    """Lengths of every scan in a closed jaxpr, sub-jaxprs (shard_map, checkpoint) included."""
    found = []
    for eqn in jaxpr.jaxpr.eqns if hasattr(jaxpr, "jaxpr") else jaxpr.eqns:
        if eqn.primitive.name == "scan":
            found.append(int(eqn.params["length"]))
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                if isinstance(sub, (jex_core.Jaxpr, jex_core.ClosedJaxpr)):
                    found += scan_lengths(sub)
    return found


def ragged_dots(jaxpr):
    """(lhs dtype, precision) of every ragged_dot in a closed jaxpr, sub-jaxprs (shard_map) included."""
    found = []
    for eqn in jaxpr.jaxpr.eqns if hasattr(jaxpr, "jaxpr") else jaxpr.eqns:
        if eqn.primitive.name.startswith("ragged_dot"):
            found.append((str(eqn.invars[0].aval.dtype), str(eqn.params.get("precision"))))
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                if isinstance(sub, (jex_core.Jaxpr, jex_core.ClosedJaxpr)):
                    found += ragged_dots(sub)
    return found


def moe_checks(out):
    """moe_mixer under a mesh: the per-expert loads (issue 14's balancing input) equal one device's
    (padding excluded), on the all-to-all and the psum layouts; bf16 parameters run the expert
    matmuls in bf16 at DEFAULT precision (bf16 ragged_dot at HIGHEST does not compile for TPU) and
    stay within bf16 tolerance of one device."""
    from elastic_jax.model.kinds.moe import MoEMasks, moe_mixer
    from elastic_jax.model.layers import Context
    p = ej.init_params(CFG, jax.random.PRNGKey(0))["layers"][3]["mixer"]
    x = jax.random.normal(jax.random.PRNGKey(1), (B, L, CFG.hidden_size))
    valid = jnp.ones((B, L), bool).at[0, -3:].set(False)
    Ie = CFG.moe_intermediate_size
    # a soft mixture of expert counts and widths in the official (pre-relu²) soft-mask form
    soft = MoEMasks(ffn_mask=jnp.where(jnp.arange(Ie) < Ie // 2, 1.0, 0.3), active_ffn=jnp.int32(Ie),
                    expert_counts=jnp.array([8, 4]), expert_probs=jnp.array([0.6, 0.4]), premask=True)

    def fwd(p, x, el=None):
        y, aux = moe_mixer(p, x, CFG, el, Context(valid=valid), None)
        return y.astype(jnp.float32), aux["expert_load"]

    def rel(a, b):
        return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))

    # token chunks (ComputePolicy.moe_token_chunk=3): 22 chunks of 3 of the 64 tokens on one device
    # (padded to 66), 3 / 11 / 6 chunks of the 8 / 32 / 16 tokens per token shard on the meshes below
    # (padded to 9 / 33 / 18); values, loads
    # and gradients (parameters, input, soft width mask and expert-count probabilities) equal the
    # unchunked call
    probe = jax.random.normal(jax.random.PRNGKey(4), (B, L, CFG.hidden_size))

    def chunk_fn(p, x, mask, probs, chunk):
        el = MoEMasks(ffn_mask=mask, active_ffn=soft.active_ffn, expert_counts=soft.expert_counts,
                      expert_probs=probs, premask=True)
        y, aux = moe_mixer(p, x, CFG, el, Context(valid=valid, policy=ej.ComputePolicy(moe_token_chunk=chunk)), None)
        return jnp.sum(y.astype(jnp.float32) * probe), aux["expert_load"]
    chunk_grad = jax.jit(jax.value_and_grad(chunk_fn, argnums=(0, 1, 2, 3), has_aux=True), static_argnums=4)

    def chunk_errs():
        (v1, l1), g1 = chunk_grad(p, x, soft.ffn_mask, soft.expert_probs, None)
        (v5, l5), g5 = chunk_grad(p, x, soft.ffn_mask, soft.expert_probs, 3)
        return {"chunk_err": abs(float(v5 - v1)) / max(1.0, abs(float(v1))), "chunk_grad_err": max_err(g5, g1),
                "chunk_load_err": float(jnp.max(jnp.abs(l5 - l1))),
                "chunk_scans": scans(3), "unchunked_scans": scans(None)}

    def scans(chunk):         # scan lengths in the forward's jaxpr: the token chunks are one scan of n
        return scan_lengths(jax.make_jaxpr(lambda *a: chunk_fn(*a, chunk))(p, x, soft.ffn_mask, soft.expert_probs))
    p16, x16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), p), x.astype(jnp.bfloat16)
    ref, ref_load = jax.jit(fwd)(p, x)
    out["moe_chunks"] = [{"mesh": "one device", "chunks": 22, **chunk_errs()}]
    ref16 = jax.jit(fwd)(p16, x16)[0]
    ref_soft = jax.jit(fwd)(p, x, soft)[0]
    out["moe"] = []
    for name, shape, rules, chunks in (("expert=8", (1, 1, 1, 8), shd.DEFAULT_RULES, 3),
                                       ("data=2,expert=4, batch->data", (2, 1, 1, 4),
                                        shd.merge_rules([("batch", "data")]), 11),
                                       ("fsdp=2,tensor=2,expert=2", (1, 2, 2, 2), shd.DEFAULT_RULES, 6)):
        with jax.set_mesh(make_mesh(MeshConfig(*shape))), shd.use_rules(rules):
            y, load = jax.jit(fwd)(p, x)
            y16 = jax.jit(fwd)(p16, x16)[0]
            y_soft = jax.jit(fwd)(p, x, soft)[0]
            dots = ragged_dots(jax.make_jaxpr(fwd)(p16, x16))
            out["moe_chunks"].append({"mesh": name, "chunks": chunks, **chunk_errs()})
        out["moe"].append({"mesh": name, "err": rel(y, ref), "load_err": float(jnp.max(jnp.abs(load - ref_load))),
                           "load_total": float(jnp.sum(load)), "bf16_err": rel(y16, ref16),
                           "bf16_vs_f32": rel(y16, ref), "ragged_dots": dots, "soft_premask_err": rel(y_soft, ref_soft)})
        print(out["moe"][-1], flush=True)


if __name__ == "__main__":
    assert jax.device_count() == 8, jax.devices()
    result = {"model": [], "kernels": []}
    which = sys.argv[2:] or ["model", "kernels", "quant", "moe"]
    if "moe" in which:
        moe_checks(result)
    if "quant" in which:
        quant_checks(result)
    if "kernels" in which:
        kernel_checks(result)
    if "model" in which:
        model_checks(result)
    with open(sys.argv[1], "w") as f:
        json.dump(result, f, indent=1)
