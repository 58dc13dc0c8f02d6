"""A pod-scale elastic distillation run as one config: the parent from its HF checkpoint, the
elastic settings, the curriculum, the data mix and the machines it is meant for.

    xp = PodExperiment(name="nano3", model=NemotronHConfig.from_hf(...), elastic=ElasticConfig(...),
                       train=TrainConfig(...), targets=(Target("v5p-256", "tpu", topology="v5p:4x4x8"),),
                       data=DataMix(reasoning=DataConfig(kind="jsonl", ...), pretraining=..., reasoning_ratio=0.7),
                       parent_hf="/ckpt/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16", checkpoint_dir="/mnt/shared/run")

`elastic-jax plan EXPERIMENT.py` compiles its step for a target without running anything
(elastic_jax/plan.py); `elastic-jax run EXPERIMENT.py` trains it on the devices of the current job
(`run_pod`: `jax.distributed` initialised from the flags or the environment on multi-host jobs, the
target chosen by the job's device count, the parent read from HF straight onto its shards, resume
from the latest complete checkpoint in `checkpoint_dir`; a SIGTERM saves and stops every host).

Targets are named as the clouds name them: a TPU `Target("v5p-256", topology="v5p:4x4x8")` is the
slice `gcloud ... --accelerator-type v5p-256` creates (128 chips, 256 TensorCores; `v5p-128` is
`4x4x4`); `tpu_accelerator_type(topology)` gives the name.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np

from .config import NemotronHConfig
from .data import DataConfig
from .elastic import ElasticConfig
from .model.policy import ComputePolicy
from .train import MeshConfig, TrainConfig

PLATFORMS = ("tpu", "gpu", "cpu")
# Cloud TPU accelerator-type suffix: TensorCores (v2-v4, v5p) or chips (v5e = "v5litepod", v6e)
_CORES_PER_CHIP = {"v2": 2, "v3": 2, "v4": 2, "v5p": 2, "v5e": 1, "v5litepod": 1, "v6e": 1}
_CLOUD_PREFIX = {"v5e": "v5litepod"}


def tpu_accelerator_type(topology: str) -> str:
    """The Cloud TPU accelerator type of a topology: "v5p:4x4x8" -> "v5p-256" (v2-v4 and v5p count
    TensorCores, two per chip; v5e / v6e count chips: "v5e:4x4" -> "v5litepod-16")."""
    gen, _, dims = topology.partition(":")
    if gen not in _CORES_PER_CHIP or not dims:
        raise ValueError(f"TPU topology {topology!r}: expected GEN:AxB[xC] with GEN one of {sorted(_CORES_PER_CHIP)}")
    chips = 1
    for d in dims.split("x"):
        chips *= int(d)
    return f"{_CLOUD_PREFIX.get(gen, gen)}-{chips * _CORES_PER_CHIP[gen]}"


def target_device_count(t: "Target") -> int:
    """Chips of a TPU target (its topology), devices of a GPU / CPU one."""
    if t.platform != "tpu":
        return int(t.devices)
    n = 1
    for d in t.topology.split(":")[1].split("x"):
        n *= int(d)
    return n


@dataclass(frozen=True)
class Target:
    """A machine the run is planned for: a TPU slice (`topology`, e.g. "v5p:4x4x8") or `devices`
    GPUs / CPU devices; `chip` names its row of `plan.CHIPS` (None: the TPU generation, or "h100").
    `mesh` None = every chip on the fsdp axis. `microbatches` / `remat` override the train config's
    for this machine (None = keep). `hbm_gib`: memory per chip when it differs from the chip's
    figure (another SKU, or memory held back for something else)."""

    name: str
    platform: str = "tpu"
    topology: str | None = None
    devices: int | None = None
    chip: str | None = None
    mesh: MeshConfig | None = None
    microbatches: int | None = None
    remat: str | None = None
    hbm_gib: float | None = None

    def __post_init__(self):
        if self.hbm_gib is not None and not self.hbm_gib > 0:
            raise ValueError(f"Target({self.name!r}).hbm_gib={self.hbm_gib!r}: must be > 0")
        if self.platform not in PLATFORMS:
            raise ValueError(f"Target({self.name!r}).platform={self.platform!r}: must be one of {PLATFORMS}")
        if self.platform == "tpu" and not self.topology:
            raise ValueError(f"Target({self.name!r}): a TPU target needs topology= (e.g. 'v5p:4x4x8')")
        if self.platform != "tpu" and not (isinstance(self.devices, int) and self.devices >= 1):
            raise ValueError(f"Target({self.name!r}): a {self.platform} target needs devices= (a positive int)")
        if self.microbatches is not None and self.microbatches < 1:
            raise ValueError(f"Target({self.name!r}).microbatches={self.microbatches!r}: must be >= 1")
        if self.platform == "tpu":
            import re
            cloud = tpu_accelerator_type(self.topology)
            m = re.fullmatch(r"(v\d+[a-z]*|v5litepod)-(\d+)", self.name)
            if m and self.name != cloud:
                raise ValueError(f"Target({self.name!r}, topology={self.topology!r}): Google Cloud names that slice "
                                 f"{cloud!r}; name the target {cloud!r} (or not after a cloud accelerator type)")


@dataclass(frozen=True)
class DataMix:
    """The training text: `reasoning_ratio` of the tokens from `reasoning`, the rest from
    `pretraining` (Star Elastic: 70% reasoning + 30% pretraining was best, METHOD §7). Either
    source may be None (all tokens from the other)."""

    reasoning: DataConfig | None = None
    pretraining: DataConfig | None = None
    reasoning_ratio: float = 0.7
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.reasoning_ratio <= 1.0:
            raise ValueError(f"DataMix.reasoning_ratio={self.reasoning_ratio!r}: must be in [0, 1]")
        if self.reasoning is None and self.pretraining is None:
            raise ValueError("DataMix: give at least one of reasoning= / pretraining=")


def mix_documents(reasoning: list, pretraining: list, ratio: float, seed: int = 0) -> list:
    """Documents of both sources with `ratio` of the tokens from `reasoning`: the source that has
    more than its share is subsampled (whole documents, seeded), then the union is shuffled."""
    rng = np.random.default_rng(seed)
    tok = lambda docs: int(sum(int(np.size(d)) for d in docs))
    r_tok, p_tok = tok(reasoning), tok(pretraining)
    if not reasoning or ratio == 0.0:
        out = list(pretraining)
    elif not pretraining or ratio == 1.0:
        out = list(reasoning)
    else:
        keep_r = min(r_tok, ratio / (1 - ratio) * p_tok)       # reasoning tokens kept
        keep_p = keep_r * (1 - ratio) / ratio
        out = _take(reasoning, keep_r, rng) + _take(pretraining, keep_p, rng)
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def _take(docs: list, tokens: float, rng) -> list:
    out, n = [], 0
    for i in rng.permutation(len(docs)):
        if n >= tokens:
            break
        out.append(docs[i])
        n += int(np.size(docs[i]))
    return out


@dataclass(frozen=True)
class PodExperiment:
    """A pod-scale Star Elastic run (see the module docstring). `published`: the paper's sizes
    {"parent": (total, active), budget fraction: (total, active), ...} in parameters, for the
    planner's comparison; `param_dtype`: the student's master weights (f32 by default, as MaxText and
    Megatron keep them; the optimizer moments follow them), `teacher_dtype` the frozen teacher's
    (bf16 by default), the router stays f32; the compute dtype is the policy's (`policy()`: bf16
    when the train config's policy leaves it unset);
    importance is estimated on `calibration_batches` x `calibration_batch_size` rows of the first
    stage's length before training (METHOD §3: 1024 samples of 8K tokens)."""

    name: str
    model: NemotronHConfig
    elastic: ElasticConfig
    train: TrainConfig
    targets: tuple[Target, ...]
    data: DataMix | None = None
    parent_hf: str | None = None
    checkpoint_dir: str | None = None
    param_dtype: str = "float32"
    teacher_dtype: str = "bfloat16"
    published: dict | None = None
    calibration_batches: int = 16
    calibration_batch_size: int = 64

    def __post_init__(self):
        if not self.targets:
            raise ValueError(f"PodExperiment({self.name!r}): needs at least one Target")
        names = [t.name for t in self.targets]
        if len(set(names)) != len(names):
            raise ValueError(f"PodExperiment({self.name!r}): target names must be distinct, got {names}")
        n = self.elastic.n_budgets
        for s in self.train.stages:
            s.probs(n)                       # budget_probs length checked against the budgets
        for f in ("param_dtype", "teacher_dtype"):
            if getattr(self, f) not in ("bfloat16", "float32"):
                raise ValueError(f"PodExperiment.{f}={getattr(self, f)!r}: must be 'bfloat16' or 'float32'")

    def target(self, name: str) -> Target:
        for t in self.targets:
            if t.name == name:
                return t
        raise ValueError(f"{self.name}: no target {name!r}; targets: {[t.name for t in self.targets]}")

    def stage(self, name: str):
        for s in self.train.stages:
            if s.name == name:
                return s
        raise ValueError(f"{self.name}: no stage {name!r}; stages: {[s.name for s in self.train.stages]}")

    def policy(self) -> ComputePolicy:
        """The compute policy: the train config's, with bf16 compute when it sets no compute dtype."""
        pol = self.train.policy or ComputePolicy()
        return pol if pol.compute_dtype is not None else dataclasses.replace(pol, compute_dtype="bfloat16")

    def run(self, out_dir: str):
        """The runner: `run_pod` (below)."""
        return run_pod(self, out_dir)


def _load_mix(mix: DataMix, vocab_size: int, parent_hf: str | None = None):
    """The training data of `mix`. Token shards (both sources kind="shards") stream as one grain
    mixture with token weights ratio / 1 - ratio, each manifest checked against the model's
    vocabulary and the parent's tokenizer.json (`parent_hf`); other kinds load into memory and mix
    by documents (`mix_documents`; small corpora and tests)."""
    from .data import make_dataset
    from .data.pipeline import ShardDataset, load_documents
    cfgs = [c for c in (mix.reasoning, mix.pretraining) if c is not None]
    if any(c.kind == "shards" for c in cfgs):
        if not all(c.kind == "shards" for c in cfgs):
            raise ValueError("DataMix: reasoning and pretraining must both be kind='shards' (token shards from "
                             "`elastic-jax tokenize`) or neither")
        paths, weights = [], []
        for c, w in ((mix.reasoning, mix.reasoning_ratio), (mix.pretraining, 1.0 - mix.reasoning_ratio)):
            if c is None or w == 0.0:
                continue
            if len(c.paths) != 1 or c.weights is not None:
                raise ValueError("DataMix: each source is one shard folder (path=...) without weights=; "
                                 "the mix sets the weights from reasoning_ratio")
            paths.append(c.paths[0])
            weights.append(w)
        merged = dataclasses.replace(cfgs[0], path=tuple(paths), weights=tuple(weights),
                                     seed=cfgs[0].seed * 7919 + mix.seed)
        return ShardDataset(merged, vocab_size, check_tokenizer=parent_hf)
    docs = {}
    for key in ("reasoning", "pretraining"):
        cfg = getattr(mix, key)
        docs[key] = load_documents(cfg)[0] if cfg is not None else []
    base = mix.reasoning or mix.pretraining
    mixed = mix_documents(docs["reasoning"], docs["pretraining"], mix.reasoning_ratio, mix.seed)
    return make_dataset(dataclasses.replace(base, kind="arrays", path=None), vocab_size, documents=mixed)


def _runtime_target(xp: PodExperiment, n_devices: int, platform: str | None = None) -> Target:
    """The target with this job's device count (and platform, when one of them matches it)."""
    fit = [t for t in xp.targets if target_device_count(t) == n_devices
           and (t.mesh is None or t.mesh.size == n_devices)]
    same = [t for t in fit if t.platform == platform]
    if same or fit:
        return (same or fit)[0]
    raise ValueError(f"{xp.name}: no target has {n_devices} devices (targets: "
                     f"{[(t.name, target_device_count(t)) for t in xp.targets]}); add a Target for this job")


def run_pod(xp: PodExperiment, out_dir: str):
    """Train on this job's devices: multi-host jobs call `jax.distributed.initialize()` first
    (`elastic-jax run --coordinator/--num-processes/--process-id`, or ELASTIC_JAX_DISTRIBUTED=1 to
    detect them from the TPU / SLURM environment), the mesh of the target with this many devices,
    the parent from `parent_hf` placed shard by shard (the student's f32 master copy and the
    teacher in `teacher_dtype`), the data mix, checkpoints under `checkpoint_dir` (or `out_dir`);
    rerun the same command to resume. Process 0 writes `result.json`, the others wait for it."""
    import jax
    import jax.numpy as jnp

    from .elastic import estimate_importance, param_count, permute_params
    from .sharding import merge_rules
    from .hf import load_hf
    from .train import train_elastic
    from .train.sharding import init_distributed, make_mesh

    if os.environ.get("ELASTIC_JAX_DISTRIBUTED") == "1":
        init_distributed()
    if xp.parent_hf is None:
        raise ValueError(f"{xp.name}: parent_hf is not set (the parent's HF checkpoint folder)")
    if xp.data is None:
        raise ValueError(f"{xp.name}: data is not set (a DataMix)")
    target = _runtime_target(xp, jax.device_count(), jax.devices()[0].platform)
    mesh_cfg = target.mesh or MeshConfig(fsdp=jax.device_count())
    train = dataclasses.replace(xp.train, mesh=mesh_cfg,
                                microbatches=target.microbatches or xp.train.microbatches)
    policy = xp.policy()
    train = dataclasses.replace(train, policy=policy if target.remat is None
                                else dataclasses.replace(policy, remat=target.remat))
    mesh = make_mesh(mesh_cfg)
    cfg, parent = load_hf(xp.parent_hf, dtype=jnp.dtype(xp.param_dtype), mesh=mesh,
                          rules=merge_rules(xp.train.sharding_rules))
    arch = lambda c: (c.hybrid_override_pattern, c.hidden_size, c.vocab_size, param_count(c))
    if arch(cfg) != arch(xp.model):
        raise ValueError(f"{xp.name}: the checkpoint in {xp.parent_hf} is not the experiment's model (pattern, "
                         f"hidden, vocab, parameters: {arch(cfg)} vs {arch(xp.model)})")
    data = _load_mix(xp.data, cfg.vocab_size, parent_hf=xp.parent_hf)
    # model preparation (METHOD §3): importance from calibration rows, the parent permuted by it; the
    # same rows every time and on every host, so a resumed run rebuilds the same teacher
    stream = data.batches(train.stages[0].seq_len, xp.calibration_batch_size, epoch_seed=10_000,
                          process_index=0, process_count=1)
    calib = [next(stream) for _ in range(xp.calibration_batches)]
    importance = estimate_importance(parent, cfg, [{"tokens": b["tokens"], "segment_ids": b["segment_ids"]}
                                                   for b in calib])
    student = permute_params(parent, cfg, importance)          # master weights, param_dtype
    del parent
    teacher = student if xp.teacher_dtype == xp.param_dtype else jax.jit(
        lambda t: jax.tree.map(lambda x: x.astype(xp.teacher_dtype), t))(student)
    run_dir = xp.checkpoint_dir or os.path.join(out_dir, "elastic")
    res = train_elastic(cfg, xp.elastic, train, teacher, student, data, run_dir)
    if jax.process_index() == 0:
        from .fileio import write_json_atomic
        write_json_atomic(os.path.join(out_dir, "result.json"),
                          {"steps": res.steps, "tokens_seen": res.tokens_seen, "resumed_from": res.resumed_from,
                           "run_dir": run_dir, "target": target.name, "processes": jax.process_count()})
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("elastic_jax.run_pod: result written")
    return res


__all__ = ["PodExperiment", "Target", "DataMix", "mix_documents", "run_pod"]
