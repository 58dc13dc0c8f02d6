"""Experiments as Python files, and the `elastic-jax run` command.

An experiment file defines `config(quick: bool = False)` returning a frozen-dataclass config. The
config's class says what runs it, in its own body: a `run(self, out_dir)` method.

    cfg = load_experiment("experiments/distill_tiny.py", quick=True)
    cfg = apply_overrides(cfg, ["train.optim.lr=1e-3", "train.stages.0.steps=5"])
    result = run_experiment(cfg, "runs/distill_tiny")     # = cfg.run("runs/distill_tiny")

    @dataclass(frozen=True)
    class MyConfig:
        steps: int = 3
        def run(self, out_dir: str):                  # the runner: my_runner(config, out_dir)
            return my_runner(self, out_dir)

The library's runners: `DistillConfig.run` (below), `StarElasticExperiment.run`
(recipes/star_elastic.py, the main job), `PodExperiment.run` (pod.py).

Command line (the lead wires `add_cli` into `elastic_jax/cli.py`; also `python -m
elastic_jax.experiment run ...`):

    elastic-jax run EXPERIMENT.py [--quick] [--out DIR] [--set key=value ...]
                    [--coordinator HOST:PORT --num-processes N --process-id I]   (multi-host)

Re-running the same command with the same `--out` resumes the run from its latest complete
checkpoint. This module also defines `DistillConfig` (random or LM-trained tiny parent ->
elastic distillation) and its runner.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Any

_HOW = "give the config class a method `def run(self, out_dir): ...` that runs it"


def register_runner(config_type: Any, fn: Any = None) -> None:
    """Removed: a config class now names its runner in its own body (a `run(self, out_dir)`
    method), so reading the config tells you what runs it."""
    name = getattr(config_type, "__name__", repr(config_type))
    raise TypeError(f"register_runner({name}, ...) was removed: {_HOW} (e.g. "
                    f"`def run(self, out_dir): return {getattr(fn, '__name__', 'my_runner')}(self, out_dir)`)")


def run_experiment(config_obj: Any, out_dir: str | os.PathLike) -> Any:
    """Run `config_obj` with its class's `run(out_dir)` method (the folder is created first)."""
    run = getattr(type(config_obj), "run", None)
    if not callable(run):
        raise ValueError(f"config type {type(config_obj).__name__} says nothing runs it: {_HOW}")
    os.makedirs(out_dir, exist_ok=True)
    return config_obj.run(os.fspath(out_dir))


class _user_code:
    """Marks exceptions raised by the user's experiment file: the CLI shows their traceback."""

    def __enter__(self):
        return self

    def __exit__(self, typ, e, tb):
        if e is not None and isinstance(e, Exception):
            try:
                e.__elastic_jax_user_code__ = True
            except AttributeError:
                pass
        return False


def load_experiment(path: str | os.PathLike, quick: bool = False, **config_kwargs) -> Any:
    """Import an experiment file and return its `config(quick=quick, **config_kwargs)` (the extra
    keywords: options the file's `config` declares, e.g. `task=` of tiny_star_elastic.py)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"experiment file {path!r} does not exist")
    name = "elastic_jax_experiment_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    with _user_code():
        spec.loader.exec_module(module)
    fn = getattr(module, "config", None)
    if not callable(fn):
        raise ValueError(f"experiment file {path!r} must define `def config(quick: bool = False)`")
    with _user_code():
        cfg = fn(quick=quick, **config_kwargs)
    if not dataclasses.is_dataclass(cfg):
        raise ValueError(f"{path}: config() must return a dataclass instance, got {type(cfg).__name__}")
    return cfg


# --------------------------------------------------------------------------- overrides
def _coerce(raw: str, current: Any, key: str) -> Any:
    if isinstance(current, str) and raw not in ("None", "null"):
        return raw
    try:
        val = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        if raw.lower() in ("true", "false"):
            val = raw.lower() == "true"
        elif raw in ("null", "none"):
            val = None
        elif current is None:
            return raw
        else:
            raise ValueError(f"override {key}={raw!r}: cannot parse the value as a {type(current).__name__}")
    if current is None or val is None:
        return val
    if isinstance(current, bool):
        if isinstance(val, bool) or val in (0, 1):
            return bool(val)
    elif isinstance(current, int):
        if isinstance(val, int) and not isinstance(val, bool):
            return val
        if isinstance(val, float) and val.is_integer():
            return int(val)
    elif isinstance(current, float):
        if isinstance(val, (int, float)) and not isinstance(val, bool):
            return float(val)
    elif isinstance(current, (tuple, list)):
        if isinstance(val, (tuple, list)):
            return tuple(val) if isinstance(current, tuple) else list(val)
    else:
        return val
    raise ValueError(f"override {key}={raw!r}: expected a {type(current).__name__} (current value {current!r})")


def _set(obj: Any, parts: list[str], raw: str, key: str) -> Any:
    head, rest = parts[0], parts[1:]
    if dataclasses.is_dataclass(obj):
        names = [f.name for f in dataclasses.fields(obj)]
        if head not in names:
            raise ValueError(f"override {key!r}: {type(obj).__name__} has no field {head!r} (fields: {names})")
        cur = getattr(obj, head)
        new = _set(cur, rest, raw, key) if rest else _coerce(raw, cur, key)
        return dataclasses.replace(obj, **{head: new})
    if isinstance(obj, (tuple, list)):
        try:
            i = int(head)
            cur = obj[i]
        except (ValueError, IndexError):
            raise ValueError(f"override {key!r}: {head!r} is not an index of a sequence of length {len(obj)}") from None
        new = _set(cur, rest, raw, key) if rest else _coerce(raw, cur, key)
        items = list(obj)
        items[i] = new
        return type(obj)(items) if isinstance(obj, tuple) else items
    if isinstance(obj, dict):
        if head not in obj:
            raise ValueError(f"override {key!r}: no key {head!r} (keys: {sorted(obj)})")
        new = _set(obj[head], rest, raw, key) if rest else _coerce(raw, obj[head], key)
        return {**obj, head: new}
    raise ValueError(f"override {key!r}: cannot descend into {type(obj).__name__} at {head!r}")


def apply_overrides(config_obj: Any, overrides) -> Any:
    """Apply "dotted.key=value" strings (sequence indices allowed: `train.stages.0.steps=5`).
    Values are coerced to the current field's type; the configs' own validation runs again."""
    for item in overrides or ():
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ValueError(f"override {item!r}: empty key")
        config_obj = _set(config_obj, key.split("."), raw.strip(), key)
    return config_obj


# --------------------------------------------------------------------------- a distillation recipe
@dataclass(frozen=True)
class DistillConfig:
    """Tiny end-to-end elastic distillation: a parent (random init from `parent_seed`, optionally
    LM-trained with `parent_train`) distilled into all budgets of `elastic` by `train` on `data`."""

    model: Any
    elastic: Any
    train: Any
    data: Any
    parent_seed: int = 0
    parent_train: Any = None

    def run(self, out_dir: str):
        """The runner: `run_distill` (below)."""
        return run_distill(self, out_dir)


def run_distill(cfg: DistillConfig, out_dir: str):
    import jax
    from . import init_params
    from .data import make_dataset
    from .fileio import write_json_atomic
    from .train import train_elastic, train_lm

    ds = make_dataset(cfg.data, cfg.model.vocab_size)
    parent = init_params(cfg.model, jax.random.PRNGKey(cfg.parent_seed))
    if cfg.parent_train is not None:
        parent = train_lm(cfg.model, cfg.parent_train, parent, ds, os.path.join(out_dir, "parent")).params
    res = train_elastic(cfg.model, cfg.elastic, cfg.train, parent, parent, ds, os.path.join(out_dir, "elastic"))
    summary = {"steps": res.steps, "tokens_seen": res.tokens_seen, "resumed_from": res.resumed_from,
               "final": res.history[-1] if res.history else None, "data": ds.stats.to_dict()}
    if jax.process_index() == 0:
        write_json_atomic(os.path.join(out_dir, "result.json"), summary)
    return res


# --------------------------------------------------------------------------- command line
def _run_cmd(args) -> int:
    from .errors import Preempted
    given = [a is not None for a in (args.coordinator, args.num_processes, args.process_id)]
    if any(given) and not all(given):
        raise ValueError("--coordinator, --num-processes and --process-id go together (or none of them: "
                         "detected from the TPU / SLURM environment with ELASTIC_JAX_DISTRIBUTED=1)")
    if all(given):          # before anything touches a device
        from .train.sharding import init_distributed
        init_distributed(args.coordinator, args.num_processes, args.process_id)
    cfg = load_experiment(args.experiment, quick=args.quick)
    cfg = apply_overrides(cfg, args.set)
    out = args.out or os.path.join("runs", os.path.splitext(os.path.basename(args.experiment))[0]
                                   + ("_quick" if args.quick else ""))
    try:
        run_experiment(cfg, out)
    except Preempted as e:
        print(f"elastic-jax run: {e}", flush=True)
        return 0
    print(f"elastic-jax run: done, outputs in {os.path.abspath(out)}")
    return 0


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register `run EXPERIMENT.py [--quick] [--out DIR] [--set key=value ...]`."""
    p = subparsers.add_parser("run", help="run an experiment file (resumes if --out holds a checkpoint)")
    p.add_argument("experiment", help="path to an experiment .py defining config(quick=False)")
    p.add_argument("--quick", action="store_true", help="the experiment's small, fast variant")
    p.add_argument("--out", default=None, help="output folder (default runs/<name>); rerun to resume")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. train.optim.lr=1e-3 (repeatable)")
    g = p.add_argument_group("multi-host (every process runs the same command with its own --process-id; "
                             "the flags override the TPU VM / SLURM detection)")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="process 0's address (jax.distributed)")
    g.add_argument("--num-processes", type=int, default=None, metavar="N")
    g.add_argument("--process-id", type=int, default=None, metavar="I", help="0 .. N-1")
    p.set_defaults(func=_run_cmd)
    return p


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m elastic_jax.experiment")
    sub = parser.add_subparsers(dest="command", required=True)
    add_cli(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    # run through the importable module (its classes, not a second copy under __main__)
    from elastic_jax.experiment import main as _main
    sys.exit(_main())
