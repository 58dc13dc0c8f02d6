"""Budget-controlled text generation over an exported checkpoint folder (issues 18, 31): a tiny
model exported with a word-level tokenizer (with a newline token) and a chat template with thinking
markers and the `enable_thinking` switch; every expected token sequence comes from the forward
pass's argmax, token by token. The chat prompt equals transformers' apply_chat_template; reasoning
off / no think tags give plain generation; max_tokens bounds thinking + end text + answer; after
the thinking budget, thinking ends at the next newline within the grace window (or at its end) and
the template's `\n</think>\n\n` is inserted, in both per-phase directions; generation_config.json
gives the sampling defaults; tok/s exclude compilation; the CLI streams and writes JSON."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

import elastic_jax as ej
from conftest import tiny_config
from elastic_jax.elastic.slicing import param_count
from elastic_jax.hf import BUDGETS_FILE, save_hf
from elastic_jax.infer.text import TextGenerator

SPECIALS = ["<pad>", "<s>", "</s>", "<think>", "</think>", "<|im_start|>", "<|im_end|>", "<unk>"]
WORDS = ["user", "assistant", "system", "hello", "world", "what", "is", "two", "plus", "three", "five", "yes",
         "no", "the", "answer", "think", "about", "it", "a", "b"]
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and m.get('reasoning_content') %}<think>\n{{ m['reasoning_content'] }}\n</think>\n\n"
    "{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% else %}<think>{% endif %}"
    "{% endif %}")
CFG = tiny_config("M*E-", vocab_size=32, intermediate_size=64, chunk_size=16, max_position_embeddings=96)
HALF = ej.Widths(hidden=16, mamba_heads=2, ffn=32, moe_experts=2, moe_ffn=8)
END_THINK = SPECIALS.index("</think>")
NL = len(SPECIALS) + len(WORDS)          # the newline token
PROMPTS = ["hello world", "what is two plus three about it", "yes"]   # different lengths: left padding
N = 8   # thinking budget and answer length everywhere: one set of compiled loops serves every test


def _tokenizer_folder(path):
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens(SPECIALS)
    tok.add_tokens([AddedToken("\n", normalized=False)])      # id NL: the grace window ends at it
    os.makedirs(path)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": TEMPLATE, "bos_token": "<s>",
                   "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}, f)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The export; the `</think>` column scaled up, so this random model writes it at varying times."""
    root = tmp_path_factory.mktemp("gen")
    tok = _tokenizer_folder(str(root / "tok"))
    params = ej.init_params(CFG, jax.random.PRNGKey(3))
    params["lm_head"] = params["lm_head"].at[:, END_THINK].multiply(4.0)
    return {"natural": save_hf(str(root / "natural"), CFG, params, budgets={"100%": ej.Widths(), "50%": HALF},
                               tokenizer_dir=tok)}


@pytest.fixture(scope="module")
def gen(folders):
    return TextGenerator.load(folders["natural"])


@pytest.fixture(scope="module")
def gen_never(gen):
    """The same family with a zero `</think>` column (logit 0, never the argmax here): it never ends
    thinking by itself."""
    params = dict(gen.model.params, lm_head=gen.model.params["lm_head"].at[:, END_THINK].set(0.0))
    return TextGenerator(dataclasses.replace(gen.model, params=params, _views=None), gen.tokenizer,
                         eos_ids=gen.eos_ids, pad_id=gen.pad_id)


def test_export_carries_budget_table_and_tokenizer(folders, gen):
    d = folders["natural"]
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", BUDGETS_FILE):
        assert os.path.isfile(os.path.join(d, f)), f
    table = json.load(open(os.path.join(d, BUDGETS_FILE)))["budgets"]
    half = next(r for r in table if r["name"] == "50%")
    assert half["active_params"] == param_count(CFG, HALF, active=True) and half["params"] == param_count(CFG, HALF)
    assert set(gen.names()) == {"100%", "50%", "full"}
    assert gen.model.budgets["50%"] == HALF and gen.eos_ids == (2,) and gen.pad_id == 0
    with pytest.raises(ValueError, match="not in this checkpoint's budget table"):
        gen.resolve("30%")
    assert gen.resolve('{"hidden": 16}') == '{"hidden":16}'          # user widths join the family


def test_chat_prompt_equals_transformers(folders, gen):
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(folders["natural"])
    chats = [[{"role": "user", "content": "what is two plus three"}],
             [{"role": "system", "content": "yes"}, {"role": "user", "content": "hello"},
              {"role": "assistant", "content": "five", "reasoning_content": "think about it"},
              {"role": "user", "content": "what is the answer"}]]
    for chat in chats:
        for kw in ({}, {"enable_thinking": False}):
            want = hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True, **kw)
            assert gen.tokenizer.render(chat, **kw) == want
            ids = hf_tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=True, return_dict=False, **kw)
            assert gen.tokenizer.encode_chat(chat, **kw) == list(ids)
    assert gen.prompt_ids("hello")[-1] == gen.tokenizer.think_id      # the template opens <think>


_forward = jax.jit(ej.forward, static_argnames=("cfg",))
FIXED = 48   # right-padded to one shape (causal model: padding after position t cannot change its logits)


def _argmax_continuation(params, ids, widths, n, stops):
    """Token by token: full forward over the sequence so far, argmax of its last position."""
    ids, out = list(ids), []
    for _ in range(n):
        logits = _forward(params, jnp.asarray([ids + [0] * (FIXED - len(ids))], jnp.int32), CFG, widths)
        t = int(jnp.argmax(logits[0, len(ids) - 1]))
        out.append(t)
        ids.append(t)
        if t in stops:
            break
    return out


def _with_params(g, **columns):
    """The same family with `lm_head` columns scaled ({token id: factor})."""
    lm = g.model.params["lm_head"]
    for t, f in columns.items():
        lm = lm.at[:, int(t)].multiply(f)
    return TextGenerator(dataclasses.replace(g.model, params=dict(g.model.params, lm_head=lm), _views=None),
                         g.tokenizer, eos_ids=g.eos_ids, pad_id=g.pad_id)


@pytest.fixture(scope="module")
def gen_nl(gen_never):
    """Never ends thinking by itself, writes newlines now and then (the 50% model after 2 tokens,
    the full model every 3): the grace window's cases."""
    return _with_params(gen_never, **{str(NL): 2.0})


@pytest.mark.parametrize("submodel", ["full", "50%"])
def test_reasoning_off_is_plain_generation_equal_to_forward_argmax(gen, submodel):
    """reasoning=False: the template's own switch (enable_thinking=False closes the block), no
    thinking phase; greedy tokens equal the forward pass's argmax; max_tokens bounds them."""
    out = gen.generate(PROMPTS, answer=submodel, reasoning=False, max_tokens=N)
    widths = gen.model.budgets[submodel].resolve(CFG)
    assert set(out.phases) == {"answer"}
    for prompt, r in zip(PROMPTS, out.results):
        ids = gen.prompt_ids(prompt, enable_thinking=False)
        assert r.prompt_ids == ids and ids[-2:] == [gen.tokenizer.think_id, END_THINK]   # <think></think>
        want = _argmax_continuation(gen.model.params, ids, widths, N, gen.eos_ids)
        assert r.answer_ids == want and r.thinking is None and r.reasoning_content is None and r.think_ids == []
        assert r.finish == ("eos" if want[-1] in gen.eos_ids else "length") and r.completion_tokens <= N
    assert out.phases["answer"].tokens == sum(len(r.answer_ids) for r in out.results)


def test_reasoning_switch_of_templates_without_enable_thinking(gen):
    """`/no_think` templates get the flag in the system prompt; a template with no switch gets its
    open block closed (no thinking)."""
    no_think = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n"
                "{% if messages[0]['content'] is defined and '/no_think' in messages[0]['content'] %}<think></think>"
                "{% else %}<think>{% endif %}{% endif %}")
    g = TextGenerator(gen.model, dataclasses.replace(gen.tokenizer, chat_template=no_think), eos_ids=gen.eos_ids,
                      pad_id=gen.pad_id)
    msgs, _ = g._switch("hello", False, {})
    assert msgs == [{"role": "system", "content": "/no_think"}, {"role": "user", "content": "hello"}]
    msgs, _ = g._switch([{"role": "system", "content": "yes"}, {"role": "user", "content": "hello"}], False, {})
    assert msgs[0] == {"role": "system", "content": "yes /no_think"}
    assert g.prompt_ids(msgs)[-2:] == [g.tokenizer.think_id, END_THINK]
    plain = TextGenerator(gen.model, dataclasses.replace(gen.tokenizer, chat_template=TEMPLATE.replace(
        "enable_thinking", "unused_switch")), eos_ids=gen.eos_ids, pad_id=gen.pad_id)
    out = plain.generate(PROMPTS, reasoning=False, max_tokens=N)
    assert set(out.phases) == {"answer"} and all(r.prompt_ids[-1] == END_THINK for r in out.results)


def test_plain_generation_without_think_tags(gen):
    """A tokenizer without thinking tags generates plainly (raw text too); asking it to think is
    one clear error."""
    tok = dataclasses.replace(gen.tokenizer, think_token="<reason>", end_think_token="</reason>")
    g = TextGenerator(gen.model, tok, eos_ids=gen.eos_ids, pad_id=gen.pad_id)
    assert not g.has_thinking_tags
    for raw in (False, True):
        out = g.generate(PROMPTS, max_tokens=N, raw=raw)
        assert set(out.phases) == {"answer"}
        for prompt, r in zip(PROMPTS, out.results):
            ids = g.prompt_ids(prompt, raw=raw)
            assert r.thinking is None and r.answer_ids == _argmax_continuation(
                gen.model.params, ids, gen.model.budgets["full"].resolve(CFG), N, gen.eos_ids)
    with pytest.raises(ValueError, match="no '<reason>' / '</reason>' tokens"):
        g.generate(PROMPTS, thinking_budget=4, max_tokens=N)


@pytest.mark.slow
def test_compiled_loop_equals_per_token_loop(gen_nl):
    kw = dict(think="50%", answer="full", thinking_budget=2, grace_period=4, max_tokens=2 * N, temperature=0.9,
              top_p=0.8, seed=3)
    compiled = gen_nl.generate(PROMPTS, **kw)
    streamed = {"think": [""] * 3, "answer": [""] * 3}

    def on_text(phase, deltas):
        for i, d in enumerate(deltas):
            streamed[phase][i] += d

    per_token = gen_nl.generate(PROMPTS, stream=on_text, **kw)
    for a, b, th, an in zip(compiled.results, per_token.results, streamed["think"], streamed["answer"]):
        assert a == b
        assert th.strip() == a.thinking.strip() and an.strip() == a.answer.strip()
    assert [p.tokens for p in compiled.phases.values()] == [p.tokens for p in per_token.phases.values()]


def test_no_budget_same_model_is_one_continuation(gen):
    """thinking_budget unset, think == answer: thinking + `</think>` + answer is the model's own
    greedy continuation of the prompt, `max_tokens` tokens in all (or up to EOS)."""
    out = gen.generate(PROMPTS, think="100%", answer="100%", max_tokens=2 * N)
    full = gen.model.budgets["full"].resolve(CFG)
    emitted = 0
    for r in out.results:
        want = _argmax_continuation(gen.model.params, r.prompt_ids, full, 2 * N, gen.eos_ids)
        seq = r.think_ids + r.end_think_ids + r.answer_ids
        assert not r.forced and r.end_think_ids in ([], [END_THINK]) and r.completion_tokens == len(seq)
        assert seq == (want if r.finish != "eos" or r.answer_ids else want[:-1])   # EOS while thinking: not kept
        emitted += r.end_think_ids == [END_THINK]
    assert emitted >= 1          # some rows wrote </think> themselves: the cache continuation is exercised


@pytest.mark.slow
def test_max_tokens_counts_both_phases(gen_never):
    """vLLM's max_tokens: a model that never ends thinking spends all of it thinking (no answer,
    finish "length"); with a budget, thinking + the inserted end text + answer fill it exactly."""
    out = gen_never.generate(PROMPTS, think="50%", answer="full", max_tokens=N)
    for r in out.results:
        assert len(r.think_ids) == N and r.answer_ids == [] and r.content == "" and r.finish == "length"
        assert not r.forced and r.end_think_ids == []
    out = gen_never.generate(PROMPTS, think="50%", answer="full", max_tokens=2 * N, thinking_budget=4,
                             grace_period=0)
    for r in out.results:
        assert len(r.think_ids) == 4 and r.end_think_ids == [NL, END_THINK, NL, NL] and r.forced
        assert r.completion_tokens == 2 * N or r.finish == "eos"
        assert len(r.answer_ids) == 2 * N - 8 or r.answer_ids[-1] in gen_never.eos_ids
    assert out.phases["think"].tokens == sum(r.reasoning_tokens for r in out.results)


def _grace_reference(g, prompt_ids, think, budget, grace):
    """Independently: the think model's greedy trace; thinking ends after the budget-th token if
    that is a newline, else after the first newline among the next `grace` tokens, else after them."""
    ref = _argmax_continuation(g.model.params, prompt_ids, g.model.budgets[think].resolve(CFG), budget + grace, ())
    if ref[budget - 1] == NL:
        return ref[:budget]
    return ref[:next((j + 1 for j in range(budget, budget + grace) if ref[j] == NL), budget + grace)]


@pytest.mark.slow
def test_thinking_budget_grace_window(gen_nl):
    """NVIDIA's budget control, both per-phase directions and the same-model continuation: after
    the budget, thinking ends at the next newline within the grace window (or at its end), the
    template's `\n</think>\n\n` is inserted, and the answer model answers after it; max_tokens
    bounds the whole. Both endings (a newline, the window's limit) occur."""
    g, grace, m = gen_nl, 4, 2 * N
    ends = set()
    for think, answer, budget in [("50%", "full", 2), ("50%", "full", 3), ("50%", "full", 4), ("full", "50%", 2),
                                  ("full", "full", 2)]:
        out = g.generate(PROMPTS, think=think, answer=answer, thinking_budget=budget, grace_period=grace,
                         max_tokens=m)
        for r in out.results:
            want = _grace_reference(g, r.prompt_ids, think, budget, grace)
            assert r.think_ids == want and r.forced and r.end_think_ids == [NL, END_THINK, NL, NL]
            ends.add("newline" if want[-1] == NL else "limit")
            rest = m - len(want) - 4
            assert r.answer_ids == _argmax_continuation(
                g.model.params, r.prompt_ids + want + [NL, END_THINK, NL, NL], g.model.budgets[answer].resolve(CFG),
                rest, g.eos_ids)
            assert r.reasoning_content == g.tokenizer.decode(want) and r.completion_tokens <= m
        assert out.phases["think"].model == think and out.phases["answer"].model == answer
        assert (out.phases["answer"].prefill_tokens > 0) == (think != answer)
    assert ends == {"newline", "limit"}


def test_thinking_budget_zero_grace_ends_exactly_at_n(gen_never):
    g, n = gen_never, N
    out = g.generate(PROMPTS, think="50%", answer="full", thinking_budget=n, grace_period=0, max_tokens=2 * n + 4,
                     end_thinking_text="</think>")
    half, full = g.model.budgets["50%"].resolve(CFG), g.model.budgets["full"].resolve(CFG)
    for prompt, r in zip(PROMPTS, out.results):
        assert r.forced and len(r.think_ids) == n and r.end_think_ids == [END_THINK]
        ids = g.prompt_ids(prompt)
        assert r.think_ids == _argmax_continuation(g.model.params, ids, half, n, ())
        assert r.answer_ids == _argmax_continuation(g.model.params, ids + r.think_ids + [END_THINK], full,
                                                    n + 3, g.eos_ids)


@pytest.mark.slow
def test_generation_config_defaults(folders, gen, tmp_path):
    """Sampling and max_tokens default to generation_config.json's values; arguments override."""
    import shutil
    d = str(tmp_path / "sampled")
    shutil.copytree(folders["natural"], d)
    gpath = os.path.join(d, "generation_config.json")
    conf = json.load(open(gpath))
    json.dump({**conf, "do_sample": True, "temperature": 0.9, "top_p": 0.8, "max_new_tokens": N}, open(gpath, "w"))
    g = TextGenerator.load(d)
    assert g.sampling_defaults() == {"temperature": 0.9, "top_p": 0.8}
    kw = dict(think="50%", answer="full", thinking_budget=N, seed=3)
    default = g.generate(PROMPTS, **kw)
    assert default.settings["temperature"] == 0.9 and default.settings["max_tokens"] == N
    explicit = gen.generate(PROMPTS, temperature=0.9, top_p=0.8, max_tokens=N, **kw)
    assert default.results == explicit.results
    assert g.generate(PROMPTS, temperature=0.0, max_tokens=N, **kw).results == gen.generate(
        PROMPTS, max_tokens=N, **kw).results                                    # override: greedy
    json.dump({**conf, "do_sample": False, "temperature": 0.9}, open(gpath, "w"))
    assert TextGenerator.load(d).sampling_defaults() == {"temperature": 0.0, "top_p": 1.0}


def test_tokens_per_s_exclude_compilation(folders):
    """A first call at new shapes (budget and max_tokens no other test uses) compiles: that time is
    in `compile_s`, not in the phase's seconds (so not in tok/s); the second call compiles nothing."""
    import time
    g = TextGenerator.load(folders["natural"])
    kw = dict(think="50%", answer="full", thinking_budget=5, grace_period=0, max_tokens=N + 3)
    t0 = time.perf_counter()
    first = g.generate(PROMPTS, **kw)
    wall = time.perf_counter() - t0
    second = g.generate(PROMPTS, **kw)
    for name, p in first.phases.items():
        assert p.compile_s > 0 and p.latency_s < p.compile_s, (name, p)
        assert second.phases[name].compile_s == 0.0
    assert first.compile_s + sum(p.latency_s for p in first.phases.values()) <= wall
    assert first.results == second.results


def test_removed_max_new_tokens_is_refused(gen):
    with pytest.raises(ValueError, match="max_new_tokens was removed: it counted answer tokens only. Use max_tokens"):
        gen.generate(PROMPTS, max_new_tokens=N)


def test_stop_strings(gen):
    base = gen.generate(PROMPTS, reasoning=False, max_tokens=N).results[0]
    words = base.answer.split()
    assert len(words) >= 3
    for stream in (None, lambda *a: None):
        r = gen.generate(PROMPTS, reasoning=False, max_tokens=N, stop=[words[2]], stream=stream).results[0]
        assert r.finish == "stop" and r.answer == base.answer[:base.answer.find(words[2])]


@pytest.mark.slow
def test_cli_streams_and_writes_json(folders, tmp_path, capsys):
    from elastic_jax.cli import main
    d = folders["natural"]
    rc = main(["generate", d, "--prompt", "hello world", "--think", "50%", "--answer", "100%",
               "--thinking-budget", str(N), "--max-tokens", str(2 * N), "--stream"])
    text = capsys.readouterr().out
    assert rc == 0 and "<think> [50%]" in text and "</think>" in text
    assert "think [50%]:" in text and "answer [100%]:" in text and "tok/s after compile" in text
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:2]) + json.dumps(
        {"messages": [{"role": "user", "content": PROMPTS[2]}]}) + "\n")
    rc = main(["generate", d, "--prompts", str(jsonl), "--think", '{"hidden": 16}', "--answer", "full",
               "--thinking-budget", str(N), "--grace-period", "0", "--max-tokens", str(2 * N), "--json"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(lines) == 3
    recs = [json.loads(l) for l in lines]
    for r in recs:
        assert set(r) >= {"reasoning_content", "content", "usage", "budgets", "phases", "finish"}
        assert r["budgets"]["think"]["name"] == '{"hidden":16}' and r["budgets"]["think"]["widths"] == {"hidden": 16}
        assert r["budgets"]["answer"]["active_params"] == param_count(CFG, ej.Widths(), active=True)
        u = r["usage"]
        assert u["reasoning_tokens"] == len(r["think_ids"]) + len(r["end_think_ids"]) <= N + 4
        assert u["completion_tokens"] == u["reasoning_tokens"] + u["content_tokens"] <= 2 * N
    assert set(recs[0]["phases"]) == {"think", "answer"} and recs[0]["phases"]["answer"]["tokens_per_s"] > 0
    assert "compile_s" in recs[0]["phases"]["think"]
    rc = main(["generate", d, "--prompt", "hello", "--reasoning", "off", "--max-tokens", "4", "--json"])
    rec = json.loads(capsys.readouterr().out.strip())
    assert rc == 0 and rec["reasoning_content"] is None and rec["budgets"]["think"] is None
    assert rec["usage"]["reasoning_tokens"] == 0 and rec["usage"]["completion_tokens"] <= 4
    rc = main(["generate", d, "--prompt", "hello", "--think", "30%"])
    assert rc == 2 and "not in this checkpoint's budget table" in capsys.readouterr().err
    rc = main(["generate", d, "--prompt", "hello", "--max-new-tokens", "16"])
    err = capsys.readouterr().err
    assert rc == 2 and "--max-new-tokens was removed" in err and "--max-tokens" in err and "--thinking-budget" in err


def test_task_checkpoint_chat_template(tmp_path):
    """The pipeline's nested checkpoint carries the task tokenizer and a chat template whose
    rendering of the digits is exactly the task prompt."""
    from elastic_jax.infer.chat import ChatTokenizer
    from elastic_jax.tasks import TaskTokenizer, make_problems, prompt_text
    task = TaskTokenizer.default()
    task.save(str(tmp_path))
    task.save_config(str(tmp_path))
    tok = ChatTokenizer.load(tmp_path)
    p = make_problems(0, 1, "test")[0]
    digits = prompt_text(p).split(" ", 1)[1].rsplit(" ", 1)[0]          # "a 3 b 7 ..."
    assert tok.encode_chat([{"role": "user", "content": digits}]) == task.encode(prompt_text(p))
    assert tok.end_think_id == task.end_think_id and tok.special["eos_token"] == "<eos>"
