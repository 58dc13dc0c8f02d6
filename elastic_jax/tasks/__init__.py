"""Embedded reasoning task (tagged running sums with carries; queries over the finished trace), its
tokenizer and dataset helpers."""
from .reasoning import (ANSWER, BOS, COMBINE_LEVELS, DEFAULT_LEVELS, END_THINK, EOS, MAX_LEVEL, MIN_LEVEL, PAD,
                        QUERY_LEVELS, RECURRENCE_LEVELS, SUM_LEVELS, THINK, Problem, answer_text, check_answer,
                        check_levels, document_text, make_problems, parse_answer, part_scores, prompt_text, score_answer,
                        scoring_units, split_of, trace_text, unit_seen)
from .tokenizer import SPECIAL_TOKENS, TaskTokenizer, build_tokenizer
from .dataset import EvalSet, make_documents, make_eval_set, vocab_needed

__all__ = ["Problem", "make_problems", "split_of", "prompt_text", "trace_text", "answer_text", "document_text",
           "parse_answer", "check_answer", "score_answer", "part_scores", "scoring_units", "unit_seen", "check_levels", "vocab_needed", "TaskTokenizer",
           "build_tokenizer", "SPECIAL_TOKENS", "make_documents", "make_eval_set", "EvalSet", "MIN_LEVEL", "MAX_LEVEL",
           "SUM_LEVELS", "QUERY_LEVELS", "RECURRENCE_LEVELS", "COMBINE_LEVELS", "DEFAULT_LEVELS",
           "BOS", "EOS", "PAD", "THINK", "END_THINK", "ANSWER"]
