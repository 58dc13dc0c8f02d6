"""Budget-controlled text generation over a checkpoint folder (METHOD §9 on real text).

    gen = TextGenerator.load("exported_hf_dir")             # model + budget table + tokenizer
    out = gen.generate(["What is 17 + 25?"], think="50%", answer="100%", thinking_budget=256)
    out.results[0].thinking, out.results[0].answer, out.phases["think"].tokens_per_s

The folder is an HF NemotronH checkpoint (`config.json` + safetensors; `elastic_budgets.json`, the
nested family written by `elastic-jax export`, is optional: without it only the full model and
widths given by the user exist); the pipeline's nested checkpoint is such a folder. The
tokenizer is the folder's `tokenizer.json`; prompts are wrapped as one user message by the chat
template of `tokenizer_config.json` (`raw=True`: the text is the prompt as is).

Budget control (NVIDIA's thinking-budget control with Star Elastic's per-phase models): the
`think` model decodes after the prompt, whose chat template leaves a `<think>` block open (one is
appended when it does not), until it writes `</think>`, an EOS, or `thinking_budget` thinking
tokens; at the budget `</think>` is forced. The `answer` model then answers: the same model
continues from its own cache; a different one re-prefills prompt + trace + `</think>`. Without
`think` / `thinking_budget` there is one phase, plain generation with the `answer` model.
Both phases run as one compiled loop each (`budget._decode_loop`); `stream=` switches to the
per-token loop (`budget.decode_stream`, same tokens) and reports text as it is produced.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..widths import Widths
from .budget import ElasticModel, _decode_loop, _force, _prefill, _span_flops, decode_stream, left_pad
from .chat import ChatTokenizer

FULL = "full"


@dataclasses.dataclass(frozen=True)
class TextPhase:
    """One phase over the batch: the submodel, tokens generated, prompt positions prefilled, wall
    seconds (prefill included; compilation too on a first call), analytic FLOPs, and the modeled
    latency (None unless a `latency_model` is given)."""

    model: str
    tokens: int
    prefill_tokens: int
    latency_s: float
    flops: float
    modeled_latency_s: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.latency_s if self.latency_s > 0 else float("nan")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "tokens_per_s": self.tokens_per_s}

    def summary(self, phase: str) -> str:
        extra = "" if self.modeled_latency_s is None else f", modeled {self.modeled_latency_s:.4f} s"
        return (f"{phase} [{self.model}]: {self.tokens} tokens in {self.latency_s:.3f} s "
                f"({self.tokens_per_s:.1f} tok/s; prefill {self.prefill_tokens} tokens{extra})")


@dataclasses.dataclass(frozen=True)
class TextResult:
    """One prompt: the prompt ids, the thinking text (None without a thinking phase), whether
    `</think>` was forced, the answer text (stop string cut off, specials kept), why it ended
    ("eos", "stop", "length"), and the generated ids of each phase."""

    prompt_ids: list
    thinking: str | None
    forced: bool
    answer: str
    finish: str
    think_ids: list
    answer_ids: list

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class TextOutput:
    results: list
    phases: dict   # "think" / "answer" -> TextPhase


def _parse_spec_widths(spec, cfg) -> Widths:
    from ..hf import parse_widths
    if isinstance(spec, Widths):
        spec.validate(cfg)
        return spec
    if isinstance(spec, Mapping):
        spec = json.dumps(dict(spec))
    return parse_widths(spec, cfg)


class TextGenerator:
    """A nested model family, its tokenizer and special ids; `generate` runs budget control."""

    def __init__(self, model: ElasticModel, tokenizer: ChatTokenizer, *, eos_ids: Sequence[int], pad_id: int,
                 sizes: Mapping[str, dict] | None = None):
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
        gpath = os.path.join(directory, "generation_config.json")
        if os.path.lexists(gpath):
            from .chat import read_generation_eos
            eos.update(read_generation_eos(gpath))
        if not eos and cfg.eos_token_id is not None:
            eos.add(cfg.eos_token_id)
        pad = tok.token_id(tok.special.get("pad_token"))
        return cls(model, tok, eos_ids=sorted(eos), pad_id=cfg.pad_token_id if pad is None else pad, sizes=sizes)

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

    # ------------------------------------------------------------------ prompts
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

    def _open_think(self, ids: list[int]) -> list[int]:
        """The prompt with a `<think>` block open at its end (appended if the template did not)."""
        t, e = self.tokenizer.think_id, self.tokenizer.end_think_id
        if t is None or e is None:
            raise ValueError(f"budget control needs {self.tokenizer.think_token!r} and "
                             f"{self.tokenizer.end_think_token!r} in the tokenizer's vocabulary")
        last_open = max((i for i, x in enumerate(ids) if x == t), default=-1)
        last_close = max((i for i, x in enumerate(ids) if x == e), default=-1)
        return ids if last_open > last_close else ids + [t]

    # ------------------------------------------------------------------ generation
    def generate(self, prompts, *, think=None, answer=None, thinking_budget: int | None = None,
                 max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 stop: Sequence[str] = (), raw: bool = False, stream: Callable | None = None,
                 latency_model: Callable | None = None, template_kwargs: Mapping | None = None) -> TextOutput:
        """Generate for a batch of prompts (left-padded together).

        think / answer: submodels (budget name, "full", or widths); thinking happens when `think`
        or `thinking_budget` is given, and `answer` defaults to `think` (and to "full").
        thinking_budget: the most thinking tokens (default `max_new_tokens`); `</think>` is forced
        there. max_new_tokens: the most answer tokens (and without a thinking phase, all tokens).
        temperature 0 = greedy; else sampling from the top-p nucleus with PRNG `seed`.
        stop: strings that end the answer (cut off). stream(phase, texts): called with each
        row's new text after every token (per-token loop) instead of the compiled loop.
        latency_model(elastic_model, submodel, phase: TextPhase) -> seconds: fills
        `modeled_latency_s` (the reproduction's latency model plugs in here)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], (dict, int, np.integer))):
            prompts = [prompts]        # one prompt: text, one chat, or token ids
        if not prompts:
            raise ValueError("no prompts")
        if max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
        if thinking_budget is not None and (not isinstance(thinking_budget, (int, np.integer)) or thinking_budget <= 0):
            raise ValueError(f"thinking_budget must be a positive int, got {thinking_budget!r}")
        if not temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if isinstance(stop, str):
            stop = (stop,)
        thinking = think is not None or thinking_budget is not None
        answer_name = self.resolve(answer if answer is not None else (think if think is not None else FULL))
        think_name = self.resolve(think) if think is not None else answer_name
        kw = dict(template_kwargs or {})
        ids = [self.prompt_ids(p, raw=raw, **kw) for p in prompts]
        if thinking:
            ids = [self._open_think(p) for p in ids]
        B, P = len(ids), max(len(p) for p in ids)
        T = int(thinking_budget or max_new_tokens) if thinking else 0
        A = int(max_new_tokens)
        need = P + (T + 1 if thinking else 0) + A
        if need > self.model.cfg.max_position_embeddings:
            raise ValueError(f"prompt {P} + thinking {T + 1 if thinking else 0} + answer {A} tokens = {need} exceeds "
                             f"the model's context ({self.model.cfg.max_position_embeddings})")
        sampling = dict(temperature=float(temperature), top_p=float(top_p), pad_token=self.pad_id)
        k_think, k_answer = jax.random.split(jax.random.PRNGKey(seed))
        plen = np.asarray([len(p) for p in ids])
        phases, zeros = {}, jnp.zeros((B,), bool)

        # ---------------- phase 1: think
        think_ids, forced, ended = [[] for _ in range(B)], np.zeros(B, bool), np.zeros(B, bool)
        if thinking:
            cfg, params, w = self.model.view(think_name)
            q = self.model.quant_view(think_name)
            toks, valid = left_pad(ids, P, self.pad_id)
            t0 = time.perf_counter()
            logits, cache = _prefill(params, jnp.asarray(toks), jnp.asarray(valid), w, cfg=cfg, max_len=need, quant=q)
            end_think = self.tokenizer.end_think_id
            out, lengths, stopped, cache, logits = self._decode(
                "think", params, w, cache, logits, zeros, T, k_think, cfg=cfg, capacity=T,
                stop_token=(end_think,) + self.eos_ids, stream=stream, stop_strings=(), quant=q, **sampling)
            out, lengths, stopped = np.asarray(out), np.asarray(lengths), np.asarray(stopped)
            last = out[np.arange(B), np.maximum(lengths - 1, 0)]
            ended = stopped & np.isin(last, self.eos_ids)         # the model finished while thinking
            forced = ~stopped
            think_ids = [list(map(int, out[i, :lengths[i] - int(stopped[i])])) for i in range(B)]   # no stop token
            if think_name == answer_name:
                logits, cache = _force(params, w, cache, logits, jnp.full((B,), end_think, jnp.int32),
                                       jnp.asarray(forced), cfg=cfg, quant=q)
            jax.block_until_ready(logits)
            dt = time.perf_counter() - t0
            n_dec = np.asarray([len(t) + 1 for t in think_ids])
            flops = sum(_span_flops(self.model, think_name, 0, plen[i] + n_dec[i]) for i in range(B))
            phases["think"] = TextPhase(think_name, int(lengths.sum() + forced.sum()), int(plen.sum()), dt, flops)

        # ---------------- phase 2: answer (or the only phase)
        cfg, params, w = self.model.view(answer_name)
        q = self.model.quant_view(answer_name)
        t0 = time.perf_counter()
        prefill_tokens, start = 0, plen.copy()
        if thinking:
            start = plen + np.asarray([len(t) + 1 for t in think_ids])
        if not thinking or think_name != answer_name:
            seqs = ([p + t + [self.tokenizer.end_think_id] for p, t in zip(ids, think_ids)] if thinking else ids)
            L = P + (T + 1 if thinking else 0)
            toks, valid = left_pad(seqs, L, self.pad_id)
            logits, cache = _prefill(params, jnp.asarray(toks), jnp.asarray(valid), w, cfg=cfg, max_len=need, quant=q)
            prefill_tokens = int(sum(len(s) for s in seqs))
        out, lengths, stopped, _, _ = self._decode(
            "answer", params, w, cache, logits, jnp.asarray(ended), A, k_answer, cfg=cfg, capacity=A,
            stop_token=self.eos_ids, stream=stream, stop_strings=tuple(stop), quant=q, **sampling)
        out, lengths, stopped = np.asarray(out), np.asarray(lengths), np.asarray(stopped)
        dt = time.perf_counter() - t0
        flops = sum(_span_flops(self.model, answer_name, start[i], start[i] + lengths[i]) for i in range(B))
        if prefill_tokens:
            flops += sum(_span_flops(self.model, answer_name, 0, start[i]) for i in range(B))
        phases["answer"] = TextPhase(answer_name, int(lengths.sum()), prefill_tokens, dt, flops)
        if latency_model is not None:
            phases = {k: dataclasses.replace(v, modeled_latency_s=float(latency_model(self.model, v.model, v)))
                      for k, v in phases.items()}

        results = []
        for i in range(B):
            a_ids = list(map(int, out[i, :lengths[i]]))
            text = self.tokenizer.decode(a_ids[:-1] if stopped[i] else a_ids)   # without the EOS
            finish = "eos" if ended[i] or stopped[i] else "length"
            cut = min((text.find(s) for s in stop if s and s in text), default=-1)
            if cut >= 0:
                text, finish = text[:cut], "stop"
            results.append(TextResult(prompt_ids=ids[i], thinking=self.tokenizer.decode(think_ids[i]) if thinking
                                      else None, forced=bool(forced[i]), answer=text, finish=finish,
                                      think_ids=think_ids[i], answer_ids=a_ids))
        return TextOutput(results=results, phases=phases)

    def _decode(self, phase, params, w, cache, logits, done0, limit, key, *, stream, stop_strings, **kw):
        """The compiled loop, or with `stream` the per-token loop reporting text deltas (and
        ending early once every row has produced one of `stop_strings`). Non-finite logits (before
        and after the compiled loop) stop generation with `NonFiniteError`."""
        from ..finite import check_logits
        check_logits(logits, f"generate ({phase} phase)")
        if stream is None:
            res = _decode_loop(params, w, cache, logits, done0, jnp.asarray(limit, jnp.int32), key, **kw)
            jax.block_until_ready(res[0])
            check_logits(res[4], f"generate ({phase} phase, after decoding)")
            return res
        B = logits.shape[0]
        gen = decode_stream(params, w, cache, logits, done0, limit, key, **kw)
        rows, texts = [[] for _ in range(B)], [""] * B
        done0 = np.asarray(done0)
        done, stopped, ends = done0.copy(), np.zeros(B, bool), [[] for _ in range(B)]
        while True:
            try:
                tok = next(gen)
            except StopIteration as e:
                return e.value
            deltas = [""] * B
            for i in np.flatnonzero(~done):
                if int(tok[i]) in kw["stop_token"]:     # EOS / </think>: not part of the text
                    stopped[i] = done[i] = True
                    ends[i] = [int(tok[i])]
                    continue
                rows[i].append(int(tok[i]))
                new = self.tokenizer.decode(rows[i])
                deltas[i] = new[len(texts[i]):] if new.startswith(texts[i]) else new
                texts[i] = new
            stream(phase, deltas)
            if stop_strings and all(done[i] or any(s in texts[i] for s in stop_strings) for i in range(B)):
                gen.close()   # every row has its stop string: end here (the compiled loop cannot)
                out = np.full((B, kw["capacity"]), kw["pad_token"], np.int32)
                rows = [r + e for r, e in zip(rows, ends)]   # with the stop token, as the compiled loop
                for i, r in enumerate(rows):
                    out[i, :len(r)] = r
                lengths = np.asarray([len(r) for r in rows])
                return out, lengths, stopped, cache, logits
