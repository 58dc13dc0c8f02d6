"""Helper for tests/test_train_resume.py: `python -m elastic_jax.experiment run ...` whose process
SIGKILLs itself at the moment orbax would commit (atomically rename) the checkpoint of step
$KILL_AT_COMMIT_STEP — all files of that checkpoint are written into orbax's temporary folder,
none is committed: a save interrupted by a crash. Without the variable it is the plain command."""
import os
import signal
import sys

from orbax.checkpoint._src.path import atomicity

kill_step = os.environ.get("KILL_AT_COMMIT_STEP")
if kill_step is not None:
    original = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self, *a, **kw):
        if self._final_path.name == kill_step:
            print(f"run_killable: SIGKILL while committing checkpoint {kill_step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return await original(self, *a, **kw)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize

from elastic_jax.experiment import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
