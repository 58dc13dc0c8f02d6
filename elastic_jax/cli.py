"""`elastic-jax` command line: run / plan / export / slice / eval / report / generate / tokenize / bench.

Each area registers its own subcommands (`add_cli(subparsers)`); this module only assembles them.
"""
from __future__ import annotations

import argparse
import sys

from .errors import EXPECTED_ERRORS


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


def _describe(e: BaseException) -> str:
    """The message of an expected error (an OSError without one gets its errno text and path)."""
    if isinstance(e, OSError) and e.strerror and not str(e).startswith("[Errno"):
        return str(e)
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return str(e) or type(e).__name__


def build_parser() -> argparse.ArgumentParser:
    from . import experiment, hf_cli, plan
    from .eval import cli as eval_cli
    from .data import tokenize as tokenize_cli
    from .infer import cli as infer_cli

    parser = argparse.ArgumentParser(prog="elastic-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    experiment.add_cli(sub)
    plan.add_cli(sub)
    hf_cli.add_cli(sub)
    eval_cli.add_cli(sub)
    infer_cli.add_cli(sub)
    tokenize_cli.add_cli(sub)
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
    except EXPECTED_ERRORS as e:
        if getattr(e, "__elastic_jax_user_code__", False):
            raise                          # the user's own experiment code: keep its traceback
        print(f"elastic-jax {args.command}: error: {_describe(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"elastic-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
