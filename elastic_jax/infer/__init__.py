"""Inference: elastic budget control (one nested submodel thinks, another answers) and the
thinking-token truncation baseline (spec §9)."""
from .budget import (BudgetOutput, ElasticModel, PhaseStats, Specials, answer_generate, budget_generate, left_pad,
                     truncation_generate)

__all__ = ["ElasticModel", "budget_generate", "truncation_generate", "BudgetOutput", "PhaseStats", "Specials",
           "left_pad", "answer_generate"]
