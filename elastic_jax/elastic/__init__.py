"""Star Elastic machinery: importance, permutation, router, cost model, slicing."""
from .slicing import param_count, slice_params, sliced_config

__all__ = ["param_count", "slice_params", "sliced_config"]
