"""Budget-controlled text generation over an exported checkpoint folder (issue 18): a tiny model
exported with a word-level tokenizer and a chat template with thinking markers; the chat prompt
equals transformers' apply_chat_template; greedy equals forward argmax; the compiled loop equals
the per-token loop; think == answer without a budget equals plain generation; a budget forces
`</think>` at exactly N thinking tokens; the CLI streams and writes JSON."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

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
    "{% if m['role'] == 'assistant' and m.get('reasoning_content') %}<think>{{ m['reasoning_content'] }}</think>"
    "{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% else %}<think>{% endif %}"
    "{% endif %}")
CFG = tiny_config("M*E-", vocab_size=32, intermediate_size=64, chunk_size=16, max_position_embeddings=96)
HALF = ej.Widths(hidden=16, mamba_heads=2, ffn=32, moe_experts=2, moe_ffn=8)
END_THINK = SPECIALS.index("</think>")
PROMPTS = ["hello world", "what is two plus three about it", "yes"]   # different lengths: left padding
N = 8   # thinking budget and answer length everywhere: one set of compiled loops serves every test


def _tokenizer_folder(path):
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens(SPECIALS)
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


@pytest.mark.parametrize("submodel", ["full", "50%"])
def test_greedy_generate_equals_forward_argmax(gen, submodel):
    n = N
    out = gen.generate(PROMPTS, answer=submodel, max_new_tokens=n)
    widths = gen.model.budgets[submodel].resolve(CFG)
    for prompt, r in zip(PROMPTS, out.results):
        want = _argmax_continuation(gen.model.params, gen.prompt_ids(prompt), widths, n, gen.eos_ids)
        assert r.answer_ids == want and r.thinking is None
        assert r.finish == ("eos" if want[-1] in gen.eos_ids else "length")
    assert out.phases["answer"].tokens == sum(len(r.answer_ids) for r in out.results)


def test_compiled_loop_equals_per_token_loop(gen):
    kw = dict(think="50%", answer="full", thinking_budget=N, max_new_tokens=N, temperature=0.9, top_p=0.8, seed=3)
    compiled = gen.generate(PROMPTS, **kw)
    streamed = {"think": [""] * 3, "answer": [""] * 3}

    def on_text(phase, deltas):
        for i, d in enumerate(deltas):
            streamed[phase][i] += d

    per_token = gen.generate(PROMPTS, stream=on_text, **kw)
    for a, b, th, an in zip(compiled.results, per_token.results, streamed["think"], streamed["answer"]):
        assert a == b
        assert th.replace("</think>", "").strip() == a.thinking.strip() and an.strip() == a.answer.strip()
    assert [p.tokens for p in compiled.phases.values()] == [p.tokens for p in per_token.phases.values()]


def test_think_equals_answer_without_budget_is_plain_generation(gen):
    m = N
    ids = [gen._open_think(gen.prompt_ids(p)) for p in PROMPTS]
    plain = gen.generate(ids, max_new_tokens=m)
    budget = gen.generate(ids, think="100%", answer="100%", max_new_tokens=m)
    emitted = 0
    for p, b in zip(plain.results, budget.results):
        ended_while_thinking = b.finish == "eos" and not b.answer_ids
        seq = b.think_ids + ([2] if ended_while_thinking else [END_THINK]) + b.answer_ids
        assert not b.forced or len(b.think_ids) == m
        assert seq[:len(p.answer_ids)] == p.answer_ids
        if p.finish == "eos":
            assert len(seq) == len(p.answer_ids)
        emitted += not b.forced
    assert emitted >= 1          # some rows wrote </think> themselves: the cache continuation is exercised


def test_thinking_budget_forces_end_think_at_exactly_n(gen_never):
    g, n = gen_never, N
    out = g.generate(PROMPTS, think="50%", answer="full", thinking_budget=n, max_new_tokens=N)
    half, full = g.model.budgets["50%"].resolve(CFG), g.model.budgets["full"].resolve(CFG)
    for prompt, r in zip(PROMPTS, out.results):
        assert r.forced and len(r.think_ids) == n
        ids = g.prompt_ids(prompt)
        assert r.think_ids == _argmax_continuation(g.model.params, ids, half, n, ())
        # the answering model re-read prompt + trace + the forced </think>
        assert r.answer_ids == _argmax_continuation(g.model.params, ids + r.think_ids + [END_THINK], full, N,
                                                    g.eos_ids)
    assert out.phases["think"].model == "50%" and out.phases["answer"].prefill_tokens > 0


def test_stop_strings(gen):
    base = gen.generate(PROMPTS, max_new_tokens=N).results[0]
    words = base.answer.split()
    assert len(words) >= 3
    for stream in (None, lambda *a: None):
        r = gen.generate(PROMPTS, max_new_tokens=N, stop=[words[2]], stream=stream).results[0]
        assert r.finish == "stop" and r.answer == base.answer[:base.answer.find(words[2])]


def test_cli_streams_and_writes_json(folders, tmp_path, capsys):
    from elastic_jax.cli import main
    d = folders["natural"]
    rc = main(["generate", d, "--prompt", "hello world", "--think", "50%", "--answer", "100%",
               "--thinking-budget", str(N), "--max-new-tokens", str(N), "--stream"])
    text = capsys.readouterr().out
    assert rc == 0 and "<think> [50%]" in text and "</think>" in text
    assert "think [50%]:" in text and "answer [100%]:" in text and "tok/s" in text
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:2]) + json.dumps(
        {"messages": [{"role": "user", "content": PROMPTS[2]}]}) + "\n")
    rc = main(["generate", d, "--prompts", str(jsonl), "--think", '{"hidden": 16}', "--answer", "full",
               "--thinking-budget", str(N), "--max-new-tokens", str(N), "--json"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(lines) == 3
    recs = [json.loads(l) for l in lines]
    assert all(r["think_model"] == '{"hidden":16}' and len(r["think_ids"]) <= N for r in recs)
    assert set(recs[0]["phases"]) == {"think", "answer"} and recs[0]["phases"]["answer"]["tokens_per_s"] > 0
    rc = main(["generate", d, "--prompt", "hello", "--think", "30%"])
    assert rc == 2 and "not in this checkpoint's budget table" in capsys.readouterr().err


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
