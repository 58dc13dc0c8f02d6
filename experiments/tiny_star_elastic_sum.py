"""The main job on the original sum levels of the embedded task (levels 1-4, traces <= 30 tokens):

    elastic-jax run experiments/tiny_star_elastic_sum.py [--quick]

Same model, curriculum and report as `tiny_star_elastic.py` (which it loads), with task="sum" (the
default before issue 15's recurrence levels; its verdict is CANNOT: the answer is trivial once the
trace exists).
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "tiny_star_elastic", os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_star_elastic.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def config(quick: bool = False):
    return _base.config(quick, task="sum")
