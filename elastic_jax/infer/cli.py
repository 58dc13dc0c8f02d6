"""`elastic-jax generate MODEL_DIR (--prompt TEXT | --prompts FILE.jsonl) [--think NAME|WIDTHS]
[--answer NAME|WIDTHS] [--thinking-budget N] ...`: budget-controlled text generation.

Text output: per prompt, the thinking part between `<think> [model]` and `</think>` lines (marked
when forced at the budget), then the answer, then one summary line per phase. `--stream` prints
tokens as they are produced (prompts one at a time, per-token loop). `--json`: one JSON record per
prompt on stdout (the stream, if any, goes to stderr)."""
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


def _record(prompt, r, out, think, answer) -> dict:
    return {"prompt": prompt, "think_model": think, "answer_model": answer, "thinking": r.thinking,
            "forced": r.forced, "answer": r.answer, "finish": r.finish, "think_ids": r.think_ids,
            "answer_ids": r.answer_ids, "phases": {k: v.to_dict() for k, v in out.phases.items()},
            "batch_size": len(out.results)}


def _cmd_generate(args) -> int:
    from .text import TextGenerator
    if args.batch_size <= 0:
        raise ValueError(f"--batch-size must be > 0, got {args.batch_size}")
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts)
    gen = TextGenerator.load(args.model_dir, mode="sliced" if args.sliced else "masked")
    kw = dict(think=args.think, answer=args.answer, thinking_budget=args.thinking_budget,
              max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
              stop=tuple(args.stop or ()), raw=args.raw)
    show = sys.stderr if args.json else sys.stdout
    thinking = args.think is not None or args.thinking_budget is not None
    if args.stream:
        batches = [[p] for p in prompts]
    else:
        batches = [prompts[i:i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    for batch in batches:
        state = {"phase": None}

        def on_text(phase, deltas, state=state):
            if phase != state["phase"]:
                if state["phase"] == "think":
                    print("\n</think>", file=show)
                state["phase"] = phase
                if phase == "think":
                    print(f"<think> [{out_names[0]}]", file=show)
                elif thinking:
                    print(f"[{out_names[1]}]", file=show)
            show.write(deltas[0])
            show.flush()

        think_name = gen.resolve(args.think) if args.think is not None else None
        answer_name = gen.resolve(args.answer if args.answer is not None else (args.think or "full"))
        out_names = (think_name or answer_name, answer_name)
        out = gen.generate(batch, stream=on_text if args.stream else None, **kw)
        for prompt, r in zip(batch, out.results):
            if args.json:
                print(json.dumps(_record(prompt, r, out, out_names[0] if thinking else None, answer_name)))
            if args.stream:
                print("\n(thinking forced at the budget)" if r.forced else "", file=show)
                continue
            if r.thinking is not None:
                print(f"<think> [{out_names[0]}]\n{r.thinking}\n</think>"
                      + (" (forced at the thinking budget)" if r.forced else ""), file=show)
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
    p.add_argument("--thinking-budget", type=int, default=None,
                   help="most thinking tokens; </think> is forced there (default: --max-new-tokens)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="most answer tokens (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", help="a stop string (repeatable)")
    p.add_argument("--raw", action="store_true", help="prompts are model text, not chat messages")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch without --stream (default 8)")
    p.add_argument("--sliced", action="store_true",
                   help="run sliced copies of the submodels (faster) instead of masked views of one parameter set")
    p.add_argument("--stream", action="store_true", help="print tokens as they are produced (per-token loop)")
    p.add_argument("--json", action="store_true", help="one JSON record per prompt on stdout")
    p.set_defaults(func=_cmd_generate, command="generate")
