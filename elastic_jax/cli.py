"""`elastic-jax` command line (placeholder until subcommands land)."""
import sys


def main(argv=None):
    print("elastic-jax: no subcommands yet", file=sys.stderr)
    return 2
