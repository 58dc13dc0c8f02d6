"""The main job on the recurrence levels of the embedded task (levels 9-12: the combine levels'
trace, an answer that recalls the values at 2-4 queried steps):

    elastic-jax run experiments/tiny_star_elastic_recurrence.py [--quick]

Same model, curriculum and report as `tiny_star_elastic.py` (which it loads), with task="recurrence"
(the default before the combine levels; 250 parent steps). Its verdict is CANNOT: the recall needs no
width once learned, so the 50% model's 5-10-point gap at 250 steps is gone by 500 (BUILD_NOTES, issue 15).
"""
import os

from elastic_jax.experiment import load_experiment


def config(quick: bool = False):
    return load_experiment(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_star_elastic.py"), quick,
                           task="recurrence", seeds=1)   # one seed: the single-seed task study of issue 15
