"""`elastic-jax` command line: run / export / slice / eval / report / generate / bench.

Each area registers its own subcommands (`add_cli(subparsers)`); this module only assembles them.
"""
from __future__ import annotations

import argparse
import sys


def _bench(args):
    import runpy
    from pathlib import Path
    scripts = {"forward": "experiments/bench_forward.py", "kernels": "kernels/bench.py",
               "train": "experiments/bench_train.py"}
    root = Path(__file__).resolve().parent.parent
    path = root / scripts[args.what]
    if not path.exists():
        raise SystemExit(f"elastic-jax bench: {path} not found (benchmarks run from a source checkout)")
    sys.argv = [str(path)] + list(args.rest)
    runpy.run_path(str(path), run_name="__main__")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import experiment, hf
    from .eval import cli as eval_cli
    from .infer import cli as infer_cli

    parser = argparse.ArgumentParser(prog="elastic-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    experiment.add_cli(sub)
    hf.add_cli(sub)
    eval_cli.add_cli(sub)
    infer_cli.add_cli(sub)
    b = sub.add_parser("bench", help="run a benchmark script (forward | kernels | train)")
    b.add_argument("what", choices=("forward", "kernels", "train"))
    b.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the script")
    b.set_defaults(func=_bench)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"elastic-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"elastic-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
