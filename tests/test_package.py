"""Package-level contracts: importing elastic_jax runs no JAX computation (multi-host jobs must be
able to call jax.distributed.initialize after `import elastic_jax`)."""
import socket
import subprocess
import sys


def test_import_leaves_distributed_initialize_possible():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = ("import elastic_jax, jax; "
            f"jax.distributed.initialize(coordinator_address='127.0.0.1:{port}', num_processes=1, process_id=0); "
            "print(jax.process_count())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("1")
