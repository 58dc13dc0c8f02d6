"""The main job on the original sum levels of the embedded task (levels 1-4, traces <= 30 tokens):

    elastic-jax run experiments/tiny_star_elastic_sum.py [--quick]

Same model, curriculum and report as `tiny_star_elastic.py` (which it loads), with task="sum" (the
default before issue 15's recurrence levels; its verdict is CANNOT: the answer is trivial once the
trace exists).
"""
import os

from elastic_jax.experiment import load_experiment


def config(quick: bool = False):
    return load_experiment(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_star_elastic.py"), quick,
                           task="sum", seeds=1)   # one seed: the single-seed task study of issue 15
