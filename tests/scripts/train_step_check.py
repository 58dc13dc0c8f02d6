"""Helper for tests/test_train_sharding.py (run in its own process: the device count is fixed
at jax import). One elastic-KD optimizer step of the experiments/distill_tiny.py model on a given
mesh, from fixed params and a fixed batch; writes the updated params (and step metrics) to NPZ.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python train_step_check.py OUT.npz 2,2,2,1 [...]
    python train_step_check.py --procs 2 --proc-id I --port P OUT.npz 4,1,2,1     (multi-process)
"""
import argparse
import os
import sys

import numpy as np

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("meshes", nargs="+", help="data,fsdp,tensor,expert (one output per mesh)")
ap.add_argument("--procs", type=int, default=1)
ap.add_argument("--proc-id", type=int, default=0)
ap.add_argument("--port", type=int, default=0)
ap.add_argument("--bf16", nargs="*", default=[], help="meshes to run again with bf16 parameters (the bf16 "
                "compute policy); outputs under 'bf16:MESH/'")
args = ap.parse_args()

import jax  # noqa: E402

if args.procs > 1:
    from elastic_jax.train.sharding import init_distributed
    init_distributed(f"127.0.0.1:{args.port}", args.procs, args.proc_id)

import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import elastic_jax as ej  # noqa: E402
from elastic_jax.elastic.router import init_router  # noqa: E402
from elastic_jax.experiment import load_experiment  # noqa: E402
from elastic_jax.train import sharding as shd  # noqa: E402
from elastic_jax.train.config import MeshConfig  # noqa: E402
from elastic_jax.train.loop import compile_step, place_state, step_shardings  # noqa: E402
from elastic_jax.train.optim import RATE_ARGS, lr_schedule, make_optimizer  # noqa: E402
from elastic_jax.train.step import StepSpec  # noqa: E402

here = os.path.dirname(os.path.abspath(__file__))
exp = load_experiment(os.path.join(here, "..", "..", "experiments", "distill_tiny.py"), quick=True)
cfg, ecfg, tcfg = exp.model, exp.elastic, exp.train
teacher = ej.init_params(cfg, jax.random.PRNGKey(0))
# a student that differs from the teacher, so the KD gradient is not ~0
student = jax.tree.map(lambda x: x * 1.1 + 0.01, teacher)
router = init_router(cfg, ecfg, jax.random.PRNGKey(1))
M, B, L = tcfg.microbatches, 8, 32
rng = np.random.default_rng(0)
tokens = rng.integers(3, cfg.vocab_size, size=(M, B // M, L)).astype(np.int32)
seg = np.ones_like(tokens)
seg[:, :, L // 2:] = 2          # two packed documents per row
seg[0, 0, -3:] = 0              # some padding
tx = make_optimizer(tcfg.optim, 10)
spec = StepSpec("elastic", cfg, cfg, ecfg, tcfg.kd_temperature, tcfg.vocab_chunk, M)
results = {}
f32_student, f32_teacher = student, teacher
for mstr in args.meshes + [f"bf16:{m}" for m in args.bf16]:
    bf16 = mstr.startswith("bf16:")
    cast = (lambda t: jax.tree.map(lambda x: x.astype(jnp.bfloat16), t)) if bf16 else (lambda t: t)
    student, teacher = cast(f32_student), cast(f32_teacher)
    shape = tuple(int(x) for x in mstr.removeprefix("bf16:").split(","))
    mc = MeshConfig(*shape)
    devices = jax.devices()[:mc.size]
    mesh = shd.make_mesh(mc, devices)
    trainable = {"params": student, "router": router}
    state_like = {"params": student, "router": router, "opt_state": jax.eval_shape(tx.init, trainable)}
    state_sh, teacher_sh = step_shardings(spec, mesh, state_like, teacher)
    state = place_state(student, router, state_sh)
    state["opt_state"] = jax.jit(tx.init, out_shardings=state_sh["opt_state"])(
        {"params": state["params"], "router": state["router"]})
    fn, bspec = compile_step(spec, tx, mesh, state_sh, teacher_sh, B // M)
    # per-host rows: this process's slice of the micro-batch dimension
    n = B // M // jax.process_count()
    lo = jax.process_index() * n
    batch = {k: shd.host_local_to_global(v[:, lo:lo + n], mesh, bspec, v.shape)
             for k, v in (("tokens", tokens), ("segment_ids", seg))}
    rep = NamedSharding(mesh, P())
    # the step's learning rates: the optimizer's schedule at its first update, as the training loop passes them
    rates = {k: jnp.float32(lr_schedule(peak, tcfg.optim, 10)(0))
             for k, peak in zip(RATE_ARGS, (tcfg.optim.lr, tcfg.optim.router_lr))}
    new, m = fn(state, jax.device_put(teacher, teacher_sh), batch, jnp.int32(3), jnp.float32(0.7),
                jnp.float32(2.0), jax.device_put(np.array([0.5, 0.5], np.float32), rep), jax.random.PRNGKey(7), rates)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        new = multihost_utils.process_allgather(new, tiled=True)
    flat = jax.tree_util.tree_flatten_with_path({"params": new["params"], "router": new["router"]})[0]
    for path, leaf in flat:
        results[f"{mstr}/{jax.tree_util.keystr(path)}"] = np.asarray(leaf, np.float32)
    results[f"{mstr}/loss"] = np.asarray(m["loss"], np.float32)
    results[f"{mstr}/budget_idx"] = np.asarray(m["budget_idx"])
    spec_names = {jax.tree_util.keystr(p): str(s.spec) for p, s in
                  jax.tree_util.tree_flatten_with_path(state_sh["params"])[0]}
    results[f"{mstr}/spec_embed"] = np.asarray(spec_names["['embed']"])
    print(f"mesh {shape}: loss {float(m['loss']):.6f} budgets {np.asarray(m['budget_idx']).tolist()}", flush=True)
if jax.process_index() == 0:
    np.savez(args.out, **results)
sys.exit(0)
