"""Helper for tests/test_faults.py: a process that SIGKILLs itself in the middle of a write.

    python kill_during_write.py save_hf_tensors OUT      # while save_hf writes its safetensors
    python kill_during_write.py save_hf_renames OUT      # between the two renames of the fallback swap
    python kill_during_write.py train_commit CKPT_DIR    # while orbax commits training checkpoint step 2
"""
import os
import signal
import sys

import numpy as np


def die():
    print("kill_during_write: SIGKILL", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def tiny():
    import elastic_jax as ej
    cfg = ej.NemotronHConfig(vocab_size=32, hidden_size=16, hybrid_override_pattern="*-", num_attention_heads=2,
                             num_key_value_heads=1, head_dim=8, intermediate_size=32)
    rng = np.random.RandomState(1)
    import jax
    is_shape = lambda x: isinstance(x, tuple) and all(isinstance(i, int) for i in x)
    params = jax.tree.map(lambda s: (0.5 * rng.randn(*s)).astype(np.float32), ej.param_shapes(cfg), is_leaf=is_shape)
    return cfg, params


mode, out = sys.argv[1], sys.argv[2]
if mode.startswith("save_hf"):
    import elastic_jax as ej
    from elastic_jax import fileio
    cfg, params = tiny()
    if mode == "save_hf_tensors":
        import safetensors.numpy as stn
        stn.save_file = lambda *a, **k: die()
    else:
        fileio._exchange = lambda a, b: False
        real = os.rename

        def rename(a, b):
            real(a, b)
            if os.path.basename(b) == "old":      # the previous folder was just moved aside
                die()
        fileio.os.rename = rename
    ej.save_hf(out, cfg, params, overwrite=True)
elif mode == "train_commit":
    from orbax.checkpoint._src.path import atomicity

    from elastic_jax.train.checkpoint import Checkpointer
    original = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self, *a, **kw):
        if self._final_path.name == "2":
            die()
        return await original(self, *a, **kw)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize
    cfg, params = tiny()
    ck = Checkpointer(out, async_save=False)
    for step in (1, 2):
        ck.save(step, {"state": {"params": params}, "rng": np.zeros(2, np.uint32)},
                {"configs": {"model": cfg.to_dict(), "elastic": None}, "step": step})
    ck.close()
print("kill_during_write: not killed", flush=True)
