"""Inference: elastic budget control (one nested submodel thinks, another answers) and the
thinking-token truncation baseline (METHOD §9); the same on text from a checkpoint folder
(`TextGenerator`, `elastic-jax generate`)."""
from .budget import (BudgetOutput, ElasticModel, PhaseStats, Specials, answer_generate, budget_generate, left_pad,
                     truncation_generate)
from .chat import ChatTokenizer
from .text import TextGenerator, TextOutput, TextPhase, TextResult, generate_text

__all__ = ["ElasticModel", "budget_generate", "truncation_generate", "BudgetOutput", "PhaseStats", "Specials",
           "left_pad", "answer_generate", "TextGenerator", "TextOutput", "TextResult", "TextPhase", "ChatTokenizer",
           "generate_text"]
