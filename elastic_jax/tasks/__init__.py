"""Embedded reasoning task (tagged running sums with carries), its tokenizer and dataset helpers."""
from .reasoning import (ANSWER, BOS, END_THINK, EOS, MAX_LEVEL, MIN_LEVEL, PAD, THINK, Problem, answer_text,
                        check_answer, document_text, make_problems, parse_answer, prompt_text, split_of,
                        trace_text)
from .tokenizer import SPECIAL_TOKENS, TaskTokenizer, build_tokenizer
from .dataset import EvalSet, make_documents, make_eval_set

__all__ = ["Problem", "make_problems", "split_of", "prompt_text", "trace_text", "answer_text", "document_text",
           "parse_answer", "check_answer", "TaskTokenizer", "build_tokenizer", "SPECIAL_TOKENS",
           "make_documents", "make_eval_set", "EvalSet", "MIN_LEVEL", "MAX_LEVEL",
           "BOS", "EOS", "PAD", "THINK", "END_THINK", "ANSWER"]
