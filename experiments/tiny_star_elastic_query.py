"""The main job on the query levels of the embedded task (levels 5-8, traces up to ~100 tokens):

    elastic-jax run experiments/tiny_star_elastic_query.py [--quick]

Same model, curriculum and report as `tiny_star_elastic.py` (which it loads), with task="query".
"""
import os

from elastic_jax.experiment import load_experiment


def config(quick: bool = False):
    return load_experiment(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_star_elastic.py"), quick,
                           task="query", seeds=1)   # one seed: the single-seed task study of issue 15
