"""Evaluation of nested submodels, the budget-control grid, Pareto analysis and the run report."""
from .config import EvalConfig
from .evaluate import GridPoint, best_at_latency, dominance, evaluate_grid, pareto_front, run_point, score
from .report import analyze, load_results, render_markdown, write_report

__all__ = ["EvalConfig", "GridPoint", "evaluate_grid", "run_point", "score", "pareto_front", "dominance", "best_at_latency",
           "analyze", "render_markdown", "write_report", "load_results"]
