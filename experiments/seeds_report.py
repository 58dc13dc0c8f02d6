"""Read several seed runs of the main job together: every interval over seeds x problems.

    python experiments/seeds_report.py RUN_DIR [RUN_DIR ...] [--out seeds_report.md]

Seed runs (3 = the issue's minimum, 5 = its documented option), each ~18 min on 2 quiet cores:

    for s in 0 1 2 3 4; do
      elastic-jax run experiments/tiny_star_elastic.py --out runs/seed$s \\
          --set seed=$s --set parent_train.seed=$s --set comparison_seed=$s
    done
    python experiments/seeds_report.py runs/seed0 runs/seed1 runs/seed2 runs/seed3 runs/seed4

See elastic_jax/eval/seeds.py.
"""
from __future__ import annotations

import argparse

from elastic_jax.eval.report import load_results
from elastic_jax.eval.seeds import combine_seeds, seeds_markdown


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="finished runs (folders holding results.json)")
    ap.add_argument("--out", default=None, help="also write the markdown here")
    a = ap.parse_args(argv)
    text = seeds_markdown(combine_seeds([load_results(r) for r in a.runs]))
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
