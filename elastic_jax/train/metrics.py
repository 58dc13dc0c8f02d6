"""Run telemetry: JSONL metrics, TensorBoard event files (tensorboardX), the batch log, a progress
bar with the loss, the sampled budget, tokens/s and ETA (tqdm), and a PNG of the curves at the end
(matplotlib, Agg).

Files under the run folder:
  metrics.jsonl   one record per logged step: loss, KD (task) loss per budget, budget loss,
                  router choices / expected widths, temperature, logit scale, learning rates,
                  tokens/s, tokens seen;
  batches.jsonl   one record per step: step, stage, sha1 of this host's batch (the data audit
                  trail used by the resume test);
  tb/             TensorBoard event files;
  curves.png      loss curves.
On resume, records at or after the restored step are dropped first, so the files read like one
uninterrupted run.
"""
from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np


def batch_digest(batch: dict) -> str:
    h = hashlib.sha1()
    for k in sorted(batch):
        a = np.ascontiguousarray(batch[k])
        h.update(k.encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _truncate_jsonl(path: str, step: int) -> None:
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:          # a line cut by a crash
                continue
            if rec.get("step", -1) < step:
                keep.append(json.dumps(rec))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("".join(l + "\n" for l in keep))
    os.replace(tmp, path)


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


class RunLogger:
    def __init__(self, out_dir: str, *, start_step: int, tensorboard: bool = True, enabled: bool = True):
        self.out_dir, self.enabled = out_dir, enabled
        self.metrics_path = os.path.join(out_dir, "metrics.jsonl")
        self.batches_path = os.path.join(out_dir, "batches.jsonl")
        self.tb = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        _truncate_jsonl(self.metrics_path, start_step)
        _truncate_jsonl(self.batches_path, start_step)
        self._metrics = open(self.metrics_path, "a")
        self._batches = open(self.batches_path, "a")
        if tensorboard:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(os.path.join(out_dir, "tb"), purge_step=start_step)

    @staticmethod
    def _append(f, path: str, record: dict) -> None:
        """One JSON line into `f`; a failed write (a full disk) is an OSError naming the file."""
        try:
            f.write(json.dumps(record) + "\n")
            f.flush()
        except OSError as e:
            raise OSError(e.errno, f"writing {path} failed: {e.strerror}") from None

    def batch(self, step: int, stage: str, digest: str) -> None:
        if self.enabled:
            self._append(self._batches, self.batches_path, {"step": step, "stage": stage, "sha1": digest})

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self._append(self._metrics, self.metrics_path, record)
        if self.tb is not None:
            step = record["step"]
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.tb.add_scalar(k.replace(".", "/"), v, step)
            self.tb.flush()

    def close(self) -> None:
        """Close every file; a failed final flush (a full disk) is one OSError naming the file, raised
        after all are closed (a bare "[Errno 28]" from here once hid which file it was)."""
        if not self.enabled:
            return
        failed = None
        for f, path in ((self._metrics, self.metrics_path), (self._batches, self.batches_path)):
            try:
                f.close()
            except OSError as e:
                failed = failed or OSError(e.errno, f"writing {path} failed: {e.strerror}")
        if self.tb is not None:
            self.tb.close()
        if failed is not None:
            raise failed


def plot_curves(metrics_path: str, out_png: str) -> str | None:
    """Loss, per-budget KD loss, budget loss and τ against the step; returns the PNG path."""
    if not os.path.exists(metrics_path):
        return None
    recs = read_jsonl(metrics_path)
    if not recs:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in recs]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(steps, [r["loss"] for r in recs], label="total")
    axes[0].plot(steps, [r["task"] for r in recs], label="KD / CE")
    axes[0].set_title("loss")
    keys = sorted({k for r in recs for k in r if k.startswith("task_budget_")})
    for k in keys:
        pts = [(r["step"], r[k]) for r in recs if k in r]
        axes[1].plot([p[0] for p in pts], [p[1] for p in pts], ".-", label=k[len("task_budget_"):])
    axes[1].set_title("KD loss per budget")
    axes[2].plot(steps, [r.get("budget_loss", 0.0) for r in recs], label="budget loss")
    if "tau" in recs[0]:
        axes[2].plot(steps, [r["tau"] for r in recs], label="tau")
    axes[2].set_title("router")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png


def progress_postfix(m: dict, tok_s: float, stage: str, budgets=None) -> dict:
    """The progress bar's fields: the step's loss, the budget(s) it sampled (elastic runs: one per
    microbatch, as fractions of the parent, e.g. `50%,100%`), tokens/s and the stage."""
    post = {"loss": f"{float(m['loss']):.4f}"}
    if budgets is not None and "budget_idx" in m:
        post["budget"] = ",".join(f"{float(budgets[int(i)]):.0%}" for i in np.asarray(m["budget_idx"]).reshape(-1))
    post.update(tok_s=f"{tok_s:,.0f}", stage=stage)
    return post


class Throughput:
    """Tokens/s over the steps since the last compile (the first step of a stage is excluded)."""

    def __init__(self):
        self.t0, self.tokens = None, 0

    def reset(self):
        self.t0, self.tokens = None, 0

    def update(self, tokens: int) -> float:
        now = time.perf_counter()
        if self.t0 is None:
            self.t0 = now
            return 0.0
        self.tokens += tokens
        return self.tokens / max(now - self.t0, 1e-9)
