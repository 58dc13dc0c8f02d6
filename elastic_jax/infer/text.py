"""Budget-controlled text generation over a checkpoint folder (METHOD §9 on real text), with the
budget semantics of NVIDIA NIM / vLLM.

    gen = TextGenerator.load("exported_hf_dir")             # model + budget table + tokenizer
    out = gen.generate(["What is 17 + 25?"], think="50%", answer="100%", max_tokens=1024,
                       thinking_budget=256)
    out.results[0].reasoning_content, out.results[0].content, out.phases["think"].tokens_per_s
    ej.generate_text("exported_hf_dir", "What is 17 + 25?", ...)   # the same, loading the folder

The folder is an HF NemotronH checkpoint (`config.json` + safetensors; `elastic_budgets.json`, the
nested family written by `elastic-jax export`, is optional: without it only the full model and
widths given by the user exist); the pipeline's nested checkpoint is such a folder. The
tokenizer is the folder's `tokenizer.json`; prompts are wrapped as one user message by the chat
template of `tokenizer_config.json` (`raw=True`: the text is the prompt as is).

Semantics (vLLM's `max_tokens`, NVIDIA's thinking-budget control, per-phase models of Star Elastic):
- `max_tokens` bounds everything generated: thinking, the end-of-thinking text and the answer.
- Thinking happens when the prompt leaves a `<think>` block open (the chat template's generation
  prompt; one is appended when `think`, `thinking_budget` or `reasoning=True` asks for it) and the
  tokenizer has both tags. `reasoning=False` turns it off through the template's own switch
  (`enable_thinking=False`, or `/no_think` in the system prompt); a template without a switch gets
  the block closed (`<think></think>`). A tokenizer without think tags: plain generation.
- `thinking_budget` (None: unlimited within `max_tokens`): after that many thinking tokens, thinking
  ends at the next newline token within `grace_period` more tokens, or at the grace window's end;
  then the template's end-of-thinking text (what it writes between an assistant turn's reasoning and
  its content, e.g. NVIDIA's `\\n</think>\\n\\n`) is inserted. A `</think>` the model writes itself
  ends thinking with no insertion.
- The `think` model thinks; the `answer` model answers: the same model continues from its cache, a
  different one re-prefills prompt + thinking + end text.
- Sampling defaults come from `generation_config.json` (temperature, top_p; greedy when it says
  `do_sample: false` or gives none), arguments override them.
- Each phase reports tokens, wall seconds of the run and tokens/s measured after compilation: the
  programs are compiled ahead of time (`jit(...).lower(...).compile()`, cached per shape) and that
  time is reported separately (`compile_s`).
Both phases run as one compiled loop each (`budget._decode_loop`); `stream=` switches to the
per-token loop (`budget.decode_stream`, same tokens) and reports text as it is produced.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..widths import Widths
from .budget import (ElasticModel, _decode_loop_jit, _decode_one, _force, _prefill, _span_flops, _stops,
                     bucket_length, decode_stream, left_pad)
from .chat import ChatTokenizer
from .text_output import TextOutput, TextPhase, TextResult

FULL = "full"
REPREFILL_BUCKET = 64          # re-prefill lengths are rounded up to this: few shapes compile
GRACE_FRACTION = 0.1           # default grace window: 10% of the thinking budget (NVIDIA NIM)
_REMOVED_MAX_NEW_TOKENS = (
    "max_new_tokens was removed: it counted answer tokens only. Use max_tokens (every generated token, "
    "thinking + end-of-thinking text + answer, as vLLM's max_tokens; CLI --max-tokens) and thinking_budget "
    "(thinking tokens, unset = unlimited within max_tokens; CLI --thinking-budget)")


def _parse_spec_widths(spec, cfg) -> Widths:
    from ..hf import parse_widths
    if isinstance(spec, Widths):
        spec.validate(cfg)
        return spec
    if isinstance(spec, Mapping):
        spec = json.dumps(dict(spec))
    return parse_widths(spec, cfg)


def _signature(tree) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((tuple(np.shape(x)), str(getattr(x, "dtype", type(x).__name__)),
                           bool(getattr(x, "weak_type", False))) for x in leaves)


class _Programs:
    """Ahead-of-time compiled programs, one per (function, argument shapes, static arguments):
    compiling is timed apart from running, so reported tokens/s exclude it."""

    def __init__(self):
        self._cache: dict = {}
        self.compile_s = 0.0

    def __call__(self, fn, *args, static: Mapping, **kwargs):
        key = (fn, _signature((args, kwargs)), tuple(sorted(static.items(), key=lambda kv: kv[0])))
        exe = self._cache.get(key)
        if exe is None:
            t0 = time.perf_counter()
            exe = fn.lower(*args, **kwargs, **static).compile()
            self.compile_s += time.perf_counter() - t0
            self._cache[key] = exe
        return exe(*args, **kwargs)


class TextGenerator:
    """A nested model family, its tokenizer, special ids and sampling defaults; `generate` runs
    budget control."""

    def __init__(self, model: ElasticModel, tokenizer: ChatTokenizer, *, eos_ids: Sequence[int], pad_id: int,
                 sizes: Mapping[str, dict] | None = None, generation_config: Mapping | None = None):
        if tokenizer.vocab_size > model.cfg.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                             f"{model.cfg.vocab_size}")
        if not eos_ids:
            raise ValueError("no EOS token id (tokenizer_config.json eos_token / config.json eos_token_id)")
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = tuple(sorted({int(i) for i in eos_ids}))
        self.pad_id = int(pad_id)
        self.sizes = dict(sizes or {})
        self.generation_config = dict(generation_config or {})
        self._programs = _Programs()
        self._newlines = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, directory: str | os.PathLike, *, mode: str = "masked", dtype=None) -> "TextGenerator":
        """An HF folder, with the nested family when it has `elastic_budgets.json` (the main job's
        nested checkpoint is one)."""
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"{directory} is not a folder")
        from .checkpoint import check_not_legacy
        check_not_legacy(directory)
        if not os.path.isfile(os.path.join(directory, "config.json")):
            raise FileNotFoundError(f"{directory}: no config.json (an HF NemotronH checkpoint)")
        from ..hf import load_hf, read_budget_table
        tok = ChatTokenizer.load(directory)        # the small files first: their errors before the weights load
        cfg, params = load_hf(directory, dtype=dtype)
        table = read_budget_table(directory, cfg)
        budgets = {n: e["widths"] for n, e in table.items()}
        sizes = {n: {"params": e["params"], "active_params": e["active_params"]} for n, e in table.items()}
        budgets = dict(budgets)
        budgets.setdefault(FULL, Widths())
        model = ElasticModel(cfg=cfg, params=params, budgets=budgets, mode=mode)
        eos = set()
        if tok.special.get("eos_token") is not None and tok.token_id(tok.special["eos_token"]) is not None:
            eos.add(tok.token_id(tok.special["eos_token"]))
        gpath, gconf = os.path.join(directory, "generation_config.json"), {}
        if os.path.lexists(gpath):
            from .chat import read_generation_config
            gconf = read_generation_config(gpath)
            eos.update(gconf["eos_token_id"])
        if not eos and cfg.eos_token_id is not None:
            eos.add(cfg.eos_token_id)
        pad = tok.token_id(tok.special.get("pad_token"))
        return cls(model, tok, eos_ids=sorted(eos), pad_id=cfg.pad_token_id if pad is None else pad, sizes=sizes,
                   generation_config=gconf)

    # ------------------------------------------------------------------ submodels
    def names(self) -> tuple[str, ...]:
        return self.model.names()

    def resolve(self, spec) -> str:
        """A submodel by budget name, `"full"`, or widths (Widths, dict, or JSON text); widths
        are added to the family under their JSON text. Returns the name."""
        if isinstance(spec, str) and spec in self.model.budgets:
            return spec
        if isinstance(spec, str) and not spec.lstrip().startswith("{"):
            raise ValueError(f"submodel {spec!r} is not in this checkpoint's budget table; known: "
                             f"{list(self.model.budgets)}, or widths as JSON")
        w = _parse_spec_widths(spec, self.model.cfg)
        name = json.dumps({f.name: getattr(w, f.name) for f in dataclasses.fields(w)
                           if getattr(w, f.name) is not None}, separators=(",", ":"))
        if name not in self.model.budgets:
            self.model = dataclasses.replace(self.model, budgets={**self.model.budgets, name: w}, _views=None)
        return name

    def budget_info(self, name: str) -> dict:
        """The nested budget a phase ran: its name, widths and (active) parameter counts."""
        w = self.model.budgets[self.model.check_name(name)]
        info = {"name": name, "widths": {f.name: getattr(w, f.name) for f in dataclasses.fields(w)
                                         if getattr(w, f.name) is not None},
                "active_params": int(self.model.active_params(name))}
        info.update(self.sizes.get(name, {}))
        return info

    # ------------------------------------------------------------------ sampling defaults
    def sampling_defaults(self) -> dict:
        """{temperature, top_p} from `generation_config.json`: its values (vLLM's reading), greedy
        when it says `do_sample: false` or gives no temperature."""
        g = self.generation_config
        t, p = g.get("temperature"), g.get("top_p")
        if g.get("do_sample") is False or not isinstance(t, (int, float)) or isinstance(t, bool):
            t = 0.0
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 < p <= 1.0:
            p = 1.0
        return {"temperature": float(t), "top_p": float(p)}

    # ------------------------------------------------------------------ thinking markers
    @property
    def has_thinking_tags(self) -> bool:
        return self.tokenizer.think_id is not None and self.tokenizer.end_think_id is not None

    def end_thinking_text(self) -> str:
        """What the chat template writes between an assistant turn's reasoning and its content
        (NVIDIA's templates: `\\n</think>\\n` or `\\n</think>\\n\\n`); just `</think>` when the
        template has none or does not render reasoning."""
        end = self.tokenizer.end_think_token
        if self.tokenizer.chat_template is None:
            return end
        r, c = "\x1fREASONING\x1f", "\x1fCONTENT\x1f"
        try:
            text = self.tokenizer.render([{"role": "user", "content": "q"},
                                          {"role": "assistant", "content": c, "reasoning_content": r}],
                                         add_generation_prompt=False)
        except Exception:          # a template that refuses this chat: fall back to the tag
            return end
        if r in text and c in text and text.index(r) < text.index(c):
            between = text[text.index(r) + len(r):text.index(c)]
            if end in between:
                return between
        return end

    def newline_ids(self) -> tuple[int, ...]:
        """Ids of the vocabulary's tokens whose text contains a newline (the grace window ends at one)."""
        if self._newlines is None:
            self._newlines = tuple(i for i in range(self.tokenizer.vocab_size)
                                   if "\n" in self.tokenizer.decode([i]))
        return self._newlines

    # ------------------------------------------------------------------ prompts
    def _switch(self, prompt, reasoning, template_kwargs: dict):
        """Apply the template's own thinking switch: (prompt, template kwargs)."""
        tpl = self.tokenizer.chat_template or ""
        if reasoning is None or not isinstance(prompt, (str, list, tuple)) or not tpl:
            return prompt, template_kwargs
        if "enable_thinking" in tpl:
            return prompt, {"enable_thinking": bool(reasoning), **template_kwargs}
        flag = "/think" if reasoning else "/no_think"
        if "/no_think" in tpl and isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):
            msgs = [dict(m) for m in prompt]
            if msgs[0].get("role") == "system":
                msgs[0]["content"] = f"{msgs[0].get('content') or ''} {flag}".strip()
            else:
                msgs.insert(0, {"role": "system", "content": flag})
            return msgs, template_kwargs
        if "/no_think" in tpl and isinstance(prompt, str):
            return [{"role": "system", "content": flag}, {"role": "user", "content": prompt}], template_kwargs
        return prompt, template_kwargs

    def prompt_ids(self, prompt, *, raw: bool = False, **template_kwargs) -> list[int]:
        """Text (one user message through the chat template, or as is with `raw`), a list of chat
        messages, or token ids."""
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, (int, np.integer)) for t in prompt):
            ids = [int(t) for t in prompt]
        elif isinstance(prompt, (list, tuple)):
            ids = self.tokenizer.encode_chat(list(prompt), **template_kwargs)
        elif isinstance(prompt, str):
            ids = (self.tokenizer.encode(prompt) if raw or self.tokenizer.chat_template is None
                   else self.tokenizer.encode_chat([{"role": "user", "content": prompt}], **template_kwargs))
        else:
            raise ValueError(f"a prompt is text, a list of chat messages or token ids; got {type(prompt).__name__}")
        if not ids:
            raise ValueError(f"prompt {prompt!r} encodes to no tokens")
        return ids

    def _think_open(self, ids: list[int]) -> bool:
        t, e = self.tokenizer.think_id, self.tokenizer.end_think_id
        last_open = max((i for i, x in enumerate(ids) if x == t), default=-1)
        last_close = max((i for i, x in enumerate(ids) if x == e), default=-1)
        return last_open > last_close

    def _open_think(self, ids: list[int]) -> list[int]:
        """The prompt with a `<think>` block open at its end (appended if the template did not)."""
        if not self.has_thinking_tags:
            raise ValueError(f"thinking needs {self.tokenizer.think_token!r} and {self.tokenizer.end_think_token!r} "
                             "in the tokenizer's vocabulary")
        return ids if self._think_open(ids) else ids + [self.tokenizer.think_id]

    # ------------------------------------------------------------------ generation
    def generate(self, prompts, *, think=None, answer=None, max_tokens: int | None = None,
                 thinking_budget: int | None = None, grace_period: int | None = None, reasoning: bool | None = None,
                 end_thinking_text: str | None = None, temperature: float | None = None, top_p: float | None = None,
                 seed: int = 0, stop: Sequence[str] = (), raw: bool = False, stream: Callable | None = None,
                 latency_model: Callable | None = None, template_kwargs: Mapping | None = None,
                 max_new_tokens=None) -> TextOutput:
        """Generate for a batch of prompts (left-padded together).

        think / answer: submodels (budget name, "full", or widths); `answer` defaults to `think`
        (and to "full"). max_tokens: every generated token (thinking + end text + answer; default
        `generation_config.json`'s max_new_tokens, else the rest of the context). thinking_budget:
        thinking tokens before the grace window (None: unlimited within max_tokens).
        grace_period: the window after the budget in which thinking ends at the next newline token
        (default 10% of the budget, rounded up; 0: end exactly at the budget). reasoning: None (the
        template's default), True or False (the template's switch). end_thinking_text: inserted
        when thinking is ended (default: the template's, `end_thinking_text()`).
        temperature / top_p: default from generation_config.json (else greedy); temperature 0 =
        greedy. stop: strings that end the answer (cut off). stream(phase, texts): called with
        each row's new text after every token (per-token loop) instead of the compiled loop.
        latency_model(elastic_model, submodel, phase: TextPhase) -> seconds: fills
        `modeled_latency_s`. max_new_tokens: removed (it meant answer tokens only); raises."""
        if max_new_tokens is not None:
            raise ValueError(_REMOVED_MAX_NEW_TOKENS)
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], (dict, int, np.integer))):
            prompts = [prompts]        # one prompt: text, one chat, or token ids
        if not prompts:
            raise ValueError("no prompts")
        for name, v, low in (("max_tokens", max_tokens, 1), ("thinking_budget", thinking_budget, 0),
                             ("grace_period", grace_period, 0)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low):
                raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
        if reasoning not in (None, True, False):
            raise ValueError(f"reasoning must be None, True or False, got {reasoning!r}")
        defaults = self.sampling_defaults()
        temperature = defaults["temperature"] if temperature is None else float(temperature)
        top_p = defaults["top_p"] if top_p is None else float(top_p)
        if not temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if isinstance(stop, str):
            stop = (stop,)
        asked = think is not None or thinking_budget is not None or reasoning is True
        if asked and not self.has_thinking_tags:
            raise ValueError(f"this tokenizer has no {self.tokenizer.think_token!r} / "
                             f"{self.tokenizer.end_think_token!r} tokens, so it cannot think: leave think, "
                             "thinking_budget and reasoning unset for plain generation")
        if reasoning is False and (think is not None or thinking_budget is not None):
            raise ValueError("reasoning=False turns thinking off; think / thinking_budget need it on")

        # ---------------- prompts, and whether there is a thinking phase
        ids = []
        for p in prompts:
            p, kw = self._switch(p, reasoning, dict(template_kwargs or {}))
            ids.append(self.prompt_ids(p, raw=raw, **kw))
        thinking = False
        if self.has_thinking_tags:
            open_ = [self._think_open(p) for p in ids]
            if reasoning is False:     # a template without a switch: close the block it opened
                ids = [p + [self.tokenizer.end_think_id] if o else p for p, o in zip(ids, open_)]
            elif asked or any(open_):
                thinking = True
                ids = [self._open_think(p) for p in ids]
        answer_name = self.resolve(answer if answer is not None else (think if think is not None else FULL))
        think_name = self.resolve(think) if think is not None else answer_name

        B, P = len(ids), max(len(p) for p in ids)
        ctx = self.model.cfg.max_position_embeddings
        if max_tokens is None:
            g = self.generation_config.get("max_new_tokens")
            max_tokens = int(g) if isinstance(g, int) and not isinstance(g, bool) and g > 0 else ctx - P
        max_tokens = int(max_tokens)
        if max_tokens <= 0 or P + max_tokens > ctx:
            raise ValueError(f"prompt {P} + max_tokens {max_tokens} tokens exceeds the model's context ({ctx})")
        end_text = self.end_thinking_text() if end_thinking_text is None else end_thinking_text
        end_ids = self.tokenizer.encode(end_text) if thinking else []
        if thinking and self.tokenizer.end_think_id not in end_ids:
            raise ValueError(f"end_thinking_text {end_text!r} must contain {self.tokenizer.end_think_token!r} "
                             "as one token")
        k = len(end_ids)
        # thinking: T1 tokens, then the grace window G (ends at a newline); room kept for the end text
        if not thinking:
            T1 = G = 0
        elif thinking_budget is None:
            T1, G = max_tokens, 0
        else:
            T1 = max(0, min(int(thinking_budget), max_tokens - k))
            g = math.ceil(GRACE_FRACTION * thinking_budget) if grace_period is None else int(grace_period)
            G = max(0, min(g, max_tokens - k - T1))
        need = P + T1 + G + k + max_tokens       # the cache: every position the loops may write
        sampling = dict(temperature=float(temperature), top_p=float(top_p), pad_token=self.pad_id)
        k_think, k_grace, k_answer = jax.random.split(jax.random.PRNGKey(seed), 3)
        plen = np.asarray([len(p) for p in ids])
        phases, progs = {}, self._programs

        # ---------------- phase 1: think
        think_ids, row_end = [[] for _ in range(B)], [[] for _ in range(B)]
        forced, ended, early = np.zeros(B, bool), np.zeros(B, bool), [None] * B   # early: why a row ended thinking
        if thinking:
            c0 = progs.compile_s
            cfg, params, w = self.model.view(think_name)
            q = self.model.quant_view(think_name)
            toks, valid = left_pad(ids, P, self.pad_id)
            toks, valid = jnp.asarray(toks), jnp.asarray(valid)
            t0, c1 = time.perf_counter(), progs.compile_s      # compile time is subtracted below
            logits, cache = progs(_prefill, params, toks, valid, w, quant=q, static=dict(cfg=cfg, max_len=need))
            end_think = self.tokenizer.end_think_id
            stops = (end_think,) + self.eos_ids
            rows = [[] for _ in range(B)]
            done = np.zeros(B, bool)
            if T1 > 0:
                out, lengths, _, cache, logits = self._decode(
                    "think", params, w, cache, logits, jnp.zeros((B,), bool), T1, k_think, cfg=cfg, capacity=T1,
                    stop_token=stops, stream=stream, stop_strings=(), quant=q, **sampling)
                out, lengths = np.asarray(out), np.asarray(lengths)
                rows = [list(map(int, out[i, :lengths[i]])) for i in range(B)]
                done = np.asarray([bool(r) and r[-1] in stops for r in rows])
            newlines = self.newline_ids() if G > 0 or thinking_budget is not None else ()
            if thinking_budget is not None:   # a line that just ended at the budget: thinking ends here
                done |= np.asarray([bool(r) and r[-1] in newlines for r in rows])
            if G > 0 and not done.all():
                out, lengths, _, cache, logits = self._decode(
                    "think", params, w, cache, logits, jnp.asarray(done), G, k_grace, cfg=cfg, capacity=G,
                    stop_token=stops + tuple(newlines), stream=stream, stop_strings=(), quant=q, prefix=rows,
                    **sampling)
                out, lengths = np.asarray(out), np.asarray(lengths)
                rows = [r if done[i] else r + list(map(int, out[i, :lengths[i]])) for i, r in enumerate(rows)]
            for i, r in enumerate(rows):
                last = r[-1] if r else None
                if last == end_think:                       # the model ended thinking itself
                    think_ids[i], row_end[i] = r[:-1], [end_think]
                elif last in self.eos_ids:                  # the model finished while thinking
                    think_ids[i], ended[i], early[i] = r[:-1], True, "eos"
                elif thinking_budget is not None:          # budget (+ grace) reached: insert the end text
                    think_ids[i], row_end[i], forced[i] = r, list(end_ids), True
                else:                                       # max_tokens reached while thinking
                    think_ids[i], ended[i], early[i] = r, True, "length"
            if think_name == answer_name and forced.any():  # continue from this cache: feed the end text
                need_ = jnp.asarray(forced)
                for t in end_ids:
                    logits, cache = progs(_force, params, w, cache, logits, jnp.full((B,), t, jnp.int32), need_,
                                          quant=q, static=dict(cfg=cfg))
            jax.block_until_ready(logits)
            c2 = progs.compile_s
            dt = time.perf_counter() - t0 - (c2 - c1)
            n_dec = np.asarray([len(t) + len(e) for t, e in zip(think_ids, row_end)])
            flops = sum(_span_flops(self.model, think_name, 0, plen[i] + n_dec[i]) for i in range(B))
            phases["think"] = TextPhase(think_name, int(n_dec.sum()), int(plen.sum()), dt, flops,
                                        compile_s=c2 - c0)

        # ---------------- phase 2: answer (or the only phase)
        used = np.asarray([len(t) + len(e) for t, e in zip(think_ids, row_end)])
        remaining = np.where(ended, 0, max_tokens - used)
        cfg, params, w = self.model.view(answer_name)
        q = self.model.quant_view(answer_name)
        c0 = progs.compile_s
        prefill_tokens, start = 0, plen + used
        prog_args = None
        if not thinking or think_name != answer_name:
            seqs = [p + t + e for p, t, e in zip(ids, think_ids, row_end)]
            L = P if not thinking else min(bucket_length(max(len(s) for s in seqs), REPREFILL_BUCKET), P + T1 + G + k)
            toks, valid = left_pad(seqs, L, self.pad_id)
            prog_args = (params, jnp.asarray(toks), jnp.asarray(valid), w)
            prefill_tokens = int(sum(len(s) for s in seqs))
        done0 = jnp.asarray(remaining <= 0)
        limit = int(remaining.max()) if remaining.size else 0
        c1 = progs.compile_s
        t0 = time.perf_counter()
        if prog_args is not None:
            logits, cache = progs(_prefill, *prog_args, quant=q, static=dict(cfg=cfg, max_len=L + max_tokens))
        if limit > 0:
            out, lengths, stopped, _, _ = self._decode(
                "answer", params, w, cache, logits, done0, limit, k_answer, cfg=cfg, capacity=max_tokens,
                stop_token=self.eos_ids, stream=stream, stop_strings=tuple(stop), quant=q, **sampling)
            out, lengths = np.asarray(out), np.asarray(lengths)
        else:
            out, lengths = np.zeros((B, 0), np.int32), np.zeros(B, np.int32)
        dt = time.perf_counter() - t0 - (progs.compile_s - c1)
        answer_ids = [list(map(int, out[i, :min(int(lengths[i]), int(max(remaining[i], 0)))])) for i in range(B)]
        alen = np.asarray([len(a) for a in answer_ids])
        flops = sum(_span_flops(self.model, answer_name, start[i], start[i] + alen[i]) for i in range(B))
        if prefill_tokens:
            flops += sum(_span_flops(self.model, answer_name, 0, start[i]) for i in range(B))
        phases["answer"] = TextPhase(answer_name, int(alen.sum()), prefill_tokens, dt, flops,
                                     compile_s=progs.compile_s - c0)
        if latency_model is not None:
            phases = {n: dataclasses.replace(v, modeled_latency_s=float(latency_model(self.model, v.model, v)))
                      for n, v in phases.items()}

        results = []
        for i in range(B):
            a_ids = answer_ids[i]
            eos = bool(a_ids) and a_ids[-1] in self.eos_ids
            text = self.tokenizer.decode(a_ids[:-1] if eos else a_ids)   # without the EOS
            finish = early[i] or ("eos" if eos else "length")
            cut = min((text.find(s) for s in stop if s and s in text), default=-1)
            if cut >= 0:
                text, finish = text[:cut], "stop"
            results.append(TextResult(prompt_ids=ids[i], thinking=self.tokenizer.decode(think_ids[i]) if thinking
                                      else None, forced=bool(forced[i]), answer=text, finish=finish,
                                      think_ids=think_ids[i], answer_ids=a_ids, end_think_ids=row_end[i]))
        settings = dict(max_tokens=max_tokens, thinking_budget=thinking_budget, grace_period=G if thinking_budget
                        is not None else None, end_thinking_text=end_text if thinking else None,
                        reasoning=thinking, temperature=temperature, top_p=top_p, seed=seed)
        return TextOutput(results=results, phases=phases, settings=settings)

    def _decode(self, phase, params, w, cache, logits, done0, limit, key, *, stream, stop_strings, stop_token,
                prefix=None, **kw):
        """The compiled loop (compiled ahead of time: `_Programs`), or with `stream` the per-token
        loop reporting text deltas (and ending early once every row has produced one of
        `stop_strings`). `prefix`: each row's tokens of this phase so far (the text deltas continue them).
        Non-finite logits (before and after the compiled loop) stop generation with `NonFiniteError`."""
        from ..finite import check_logits
        check_logits(logits, f"generate ({phase} phase)")
        progs = self._programs
        if stream is None:
            static = {n: kw[n] for n in ("cfg", "capacity", "pad_token", "temperature", "top_p")}
            res = progs(_decode_loop_jit, params, w, cache, logits, done0, jnp.asarray(limit, jnp.int32), key,
                        _stops(stop_token), quant=kw.get("quant"), static=static)
            jax.block_until_ready(res[0])
            check_logits(res[4], f"generate ({phase} phase, after decoding)")
            return res

        def step(*args, **skw):
            static = {n: skw.pop(n) for n in ("cfg", "stop_token", "pad_token", "temperature", "top_p")}
            return progs(_decode_one, *args, static=static, **skw)

        B = logits.shape[0]
        gen = decode_stream(params, w, cache, logits, done0, limit, key, stop_token=stop_token, step=step, **kw)
        prefix = prefix or [[] for _ in range(B)]
        rows, texts = [list(p) for p in prefix], [self.tokenizer.decode(p) for p in prefix]
        done0 = np.asarray(done0)
        done, stopped, ends = done0.copy(), np.zeros(B, bool), [[] for _ in range(B)]
        while True:
            try:
                tok = next(gen)
            except StopIteration as e:
                return e.value
            deltas = [""] * B
            for i in np.flatnonzero(~done):
                t = int(tok[i])
                if t in stop_token and (t == self.tokenizer.end_think_id or t in self.eos_ids):
                    stopped[i] = done[i] = True          # EOS / </think>: not part of the text
                    ends[i] = [int(tok[i])]
                    continue
                rows[i].append(int(tok[i]))
                new = self.tokenizer.decode(rows[i])
                deltas[i] = new[len(texts[i]):] if new.startswith(texts[i]) else new
                texts[i] = new
                if int(tok[i]) in stop_token:            # a newline ending the grace window: shown, then stop
                    stopped[i] = done[i] = True
            stream(phase, deltas)
            if stop_strings and all(done[i] or any(s in texts[i] for s in stop_strings) for i in range(B)):
                gen.close()   # every row has its stop string: end here (the compiled loop cannot)
                out = np.full((B, kw["capacity"]), kw["pad_token"], np.int32)
                rows = [r[len(p):] + e for r, p, e in zip(rows, prefix, ends)]   # with the stop token, as compiled
                for i, r in enumerate(rows):
                    out[i, :len(r)] = r
                lengths = np.asarray([len(r) for r in rows])
                return out, lengths, stopped, cache, logits


def generate_text(model, prompts, **kwargs) -> TextOutput:
    """`TextGenerator.load(model).generate(prompts, **kwargs)` (`model`: a checkpoint folder, or a
    loaded `TextGenerator`): the budget-control API in one call; see `TextGenerator.generate`."""
    gen = model if isinstance(model, TextGenerator) else TextGenerator.load(model)
    return gen.generate(prompts, **kwargs)
