"""Star Elastic machinery: importance, permutation, router, cost model, slicing."""
from .budgets import (BudgetSizeWarning, budget_family, check_budget_size, measured_fraction, trained_widths,
                      widths_for_budget)
from .config import BudgetTarget, ElasticConfig
from .cost import budget_loss, expected_widths, memory_cost, param_cost
from .importance import (Importance, config_fingerprint, elastify, estimate_importance, identity_importance,
                         permute_params, rank_layers)
from .router import (RouterOutput, budget_code, budget_code_from_index, budget_widths, init_router, route,
                     router_axes, router_key, schedules)
from .quant_slicing import slice_quant_state
from .slicing import param_count, slice_params, sliced_config

__all__ = ["param_count", "slice_params", "slice_quant_state", "sliced_config", "BudgetTarget", "ElasticConfig", "budget_loss", "expected_widths",
           "memory_cost", "param_cost", "Importance", "config_fingerprint", "elastify", "estimate_importance",
           "identity_importance", "permute_params", "rank_layers", "RouterOutput", "budget_code",
           "budget_code_from_index", "budget_widths", "init_router", "route", "router_axes", "router_key",
           "schedules", "BudgetSizeWarning", "budget_family", "check_budget_size", "measured_fraction",
           "trained_widths", "widths_for_budget"]
