"""`elastic-jax generate MODEL_DIR (--prompt TEXT | --prompts FILE.jsonl) [--think NAME|WIDTHS]
[--answer NAME|WIDTHS] [--thinking-budget N] ...`: budget-controlled text generation.

Text output: per prompt, the thinking part between `<think> [model]` and `</think>` lines (marked
when ended at the budget), then the answer, then one summary line per phase (tokens/s measured
after compilation; compile seconds apart). `--stream` prints
tokens as they are produced (prompts one at a time, per-token loop). `--json`: one JSON record per
prompt on stdout (`reasoning_content`, `content`, `usage` token counts per phase, `budgets`: the
nested budget of each phase, `phases`, `settings`; the stream, if any, goes to stderr). Budget
semantics: `elastic_jax/infer/text.py`."""
from __future__ import annotations

import json
import sys


def read_prompts(path: str) -> list:
    """JSONL: each line {"prompt": text} or {"messages": [...]} or a JSON string."""
    from .chat import read_text
    prompts = []
    for n, line in enumerate(read_text(path, "prompts").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e})") from None
        if isinstance(rec, str):
            prompts.append(rec)
        elif isinstance(rec, dict) and isinstance(rec.get("prompt"), str):
            prompts.append(rec["prompt"])
        elif isinstance(rec, dict) and isinstance(rec.get("messages"), list):
            prompts.append(rec["messages"])
        else:
            raise ValueError(f"{path}:{n}: expected a JSON string, {{\"prompt\": text}} or {{\"messages\": [...]}}")
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def _record(prompt, r, out, gen, think, answer) -> dict:
    """One prompt's JSON record: the OpenAI-style `reasoning_content` / `content`, token counts per
    phase, the nested budget each phase ran, the batch's phase timings and the settings."""
    rec = {"prompt": prompt, "reasoning_content": r.reasoning_content, "content": r.content, "finish": r.finish,
           "forced": r.forced,
           "usage": {"prompt_tokens": len(r.prompt_ids), "reasoning_tokens": r.reasoning_tokens,
                     "content_tokens": len(r.answer_ids), "completion_tokens": r.completion_tokens},
           "budgets": {"think": gen.budget_info(think) if think is not None else None,
                       "answer": gen.budget_info(answer)},
           "think_ids": r.think_ids, "end_think_ids": r.end_think_ids, "answer_ids": r.answer_ids,
           "phases": {k: v.to_dict() for k, v in out.phases.items()}, "settings": out.settings,
           "batch_size": len(out.results)}
    return rec


def _cmd_generate(args) -> int:
    from .text import _REMOVED_MAX_NEW_TOKENS, TextGenerator
    if args.max_new_tokens is not None:
        raise ValueError("--max-new-tokens " + _REMOVED_MAX_NEW_TOKENS.split(" ", 1)[1])
    if args.batch_size <= 0:
        raise ValueError(f"--batch-size must be > 0, got {args.batch_size}")
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts)
    gen = TextGenerator.load(args.model_dir, mode="sliced" if args.sliced else "masked")
    reasoning = None if args.reasoning is None else args.reasoning == "on"
    end_text = None if args.end_thinking_text is None else args.end_thinking_text.replace("\\n", "\n")
    kw = dict(think=args.think, answer=args.answer, max_tokens=args.max_tokens, thinking_budget=args.thinking_budget,
              grace_period=args.grace_period, reasoning=reasoning, end_thinking_text=end_text,
              temperature=args.temperature, top_p=args.top_p, seed=args.seed, stop=tuple(args.stop or ()),
              raw=args.raw)
    show = sys.stderr if args.json else sys.stdout
    if args.stream:
        batches = [[p] for p in prompts]
    else:
        batches = [prompts[i:i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    think_name = gen.resolve(args.think) if args.think is not None else None
    answer_name = gen.resolve(args.answer if args.answer is not None else (args.think or "full"))
    names = (think_name or answer_name, answer_name)
    for batch in batches:
        state = {"phase": None}

        def on_text(phase, deltas, state=state):
            if phase != state["phase"]:
                if state["phase"] == "think":
                    print(f"\n</think>\n[{names[1]}]", file=show)
                state["phase"] = phase
                if phase == "think":
                    print(f"<think> [{names[0]}]", file=show)
            show.write(deltas[0])
            show.flush()

        out = gen.generate(batch, stream=on_text if args.stream else None, **kw)
        thinking = "think" in out.phases
        for prompt, r in zip(batch, out.results):
            if args.json:
                print(json.dumps(_record(prompt, r, out, gen, names[0] if thinking else None, answer_name)))
            if args.stream:
                print("\n(thinking ended at the budget)" if r.forced else "", file=show)
                continue
            if r.thinking is not None:
                print(f"<think> [{names[0]}]\n{r.thinking}\n</think>"
                      + (" (ended at the thinking budget)" if r.forced else ""), file=show)
                print(f"[{answer_name}]", file=show)
            print(r.answer, file=show)
        for phase, stats in out.phases.items():
            print(stats.summary(phase if thinking else "generate"), file=show)
    return 0


def add_cli(subparsers) -> None:
    """Register `generate` on an argparse subparsers object (handler in `func`)."""
    text = "generate text with one nested model thinking and another answering (budget control)"
    p = subparsers.add_parser("generate", help=text, description=text)
    p.add_argument("model_dir", help="checkpoint folder: HF (config.json, safetensors, tokenizer.json, "
                                     "optional elastic_budgets.json), e.g. the pipeline's nested checkpoint")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt (a user message through the chat template; --raw: as is)")
    src.add_argument("--prompts", help='JSONL file: {"prompt": text} or {"messages": [...]} per line')
    p.add_argument("--think", default=None,
                   help='thinking submodel: a budget name of the checkpoint, "full", or widths JSON')
    p.add_argument("--answer", default=None, help="answering submodel (default: --think, else full)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="most generated tokens, thinking + end-of-thinking text + answer (vLLM's max_tokens; "
                        "default: generation_config.json's max_new_tokens, else the rest of the context)")
    p.add_argument("--thinking-budget", type=int, default=None,
                   help="thinking tokens before the grace window; then thinking ends at the next newline (or the "
                        "window's end) and the template's end-of-thinking text is inserted (default: unlimited "
                        "within --max-tokens)")
    p.add_argument("--grace-period", type=int, default=None,
                   help="the grace window after the budget, in tokens (default 10%% of the budget; 0 = end at it)")
    p.add_argument("--reasoning", choices=("on", "off"), default=None,
                   help="thinking on/off through the chat template's switch (enable_thinking, /no_think); "
                        "default: the template's default")
    p.add_argument("--end-thinking-text", default=None,
                   help="text inserted when thinking is ended at the budget (default: the chat template's, "
                        "e.g. '\\n</think>\\n\\n')")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="removed (it counted answer tokens only): use --max-tokens and --thinking-budget")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (default: generation_config.json's, else greedy)")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling mass (default: generation_config.json's, else 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", help="a stop string (repeatable)")
    p.add_argument("--raw", action="store_true", help="prompts are model text, not chat messages")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch without --stream (default 8)")
    p.add_argument("--sliced", action="store_true",
                   help="run sliced copies of the submodels (faster) instead of masked views of one parameter set")
    p.add_argument("--stream", action="store_true", help="print tokens as they are produced (per-token loop)")
    p.add_argument("--json", action="store_true", help="one JSON record per prompt on stdout")
    p.set_defaults(func=_cmd_generate, command="generate")
