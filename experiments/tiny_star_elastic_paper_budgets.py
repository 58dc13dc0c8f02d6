"""The main job with the budgets as the paper states them (issue 30): a total-parameter and an
active-parameter target together (METHOD §6.2), and the long curriculum stage on documents longer
than the short stage's rows (`min_doc_len`, METHOD §7.3):

    elastic-jax run experiments/tiny_star_elastic_paper_budgets.py [--quick]

Same task, model and report as `tiny_star_elastic.py` (which it loads, `budgets="paper"`). Not the
default: no full run of it was measured (BUILD_NOTES, issue 30).
"""
import os

from elastic_jax.experiment import load_experiment


def config(quick: bool = False):
    return load_experiment(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_star_elastic.py"), quick,
                           budgets="paper")
