"""Runs `elastic-jax plan` on shrunken paper experiments over 8 host CPU devices (the device count
is fixed when jax starts, so tests/test_plan.py runs this in its own process) and writes the JSON
of every plan to argv[1]."""
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
    # the 12B's CPU compile, judged against a deliberately tiny HBM
    "nano2_oversized": ("nano2", ["--platform", "cpu", "--devices", "8", "--stage", "long", "--hbm-gib", "0.0005"]),
    "nano3_gpu": ("nano3", ["--platform", "gpu", "--devices", "8", "--chip", "h200"]),
}


def main(out_path: str) -> int:
    from elastic_jax.cli import main as cli
    results = {}
    for name, (xp, args) in RUNS.items():
        os.environ["SHRUNK_SOURCE"] = XP[xp]
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = cli(["plan", SHRUNK, "--json", *args])
        results[name] = {"rc": rc, "plan": json.loads(buf.getvalue()) if rc == 0 else None}
    with open(out_path, "w") as f:
        json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
