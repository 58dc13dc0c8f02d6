"""Budget-controlled generation (METHOD §9): equals running the two submodels by hand; truncation
emits exactly the budgeted number of thinking tokens; bad inputs raise clear errors."""
import json

import jax
import numpy as np
import pytest

import elastic_jax as ej
from conftest import assert_trees_equal, tiny_config
from elastic_jax.infer import (ElasticModel, Specials, answer_generate, budget_generate, left_pad,
                              truncation_generate)
from elastic_jax.hf import read_router
from elastic_jax.infer.checkpoint import flatten, load_nested, save_nested, unflatten
from elastic_jax.tasks import TaskTokenizer, make_eval_set

TOK = TaskTokenizer.default()
SP = Specials.from_tokenizer(TOK)
CFG = tiny_config("M*E-", vocab_size=32, intermediate_size=64, chunk_size=16, max_position_embeddings=128)
BUDGETS = {"100%": ej.Widths(), "50%": ej.Widths(hidden=16, mamba_heads=2, ffn=32, moe_experts=2, moe_ffn=8)}


def _bias_end_think(params, strength):
    """Scale up the `</think>` column: this random model then emits it on some rows, at varying times."""
    p = jax.tree_util.tree_map(lambda x: x, params)
    p["lm_head"] = p["lm_head"].at[:, SP.end_think].add(strength)
    return p


@pytest.fixture(scope="module")
def model():
    params = ej.init_params(CFG, jax.random.PRNGKey(3))
    params = _bias_end_think(params, 0.35)
    return ElasticModel(CFG, params, BUDGETS, mode="masked")


@pytest.fixture(scope="module")
def prompts():
    ev = make_eval_set(0, 6, "test", (1, 2, 4), tokenizer=TOK)     # different prompt lengths
    assert len({len(p) for p in ev.prompts}) > 1
    return [list(p) for p in ev.prompts]


def _by_hand(model, prompts, a, b, budget, max_answer):
    """Row by row with ej.generate (fixed left-padded shapes: one compile): A until </think> or the
    budget, force </think>, then B answers after prompt + trace + </think>."""
    ca, pa, wa = model.masked_view(a)
    cb, pb, wb = model.masked_view(b)
    P = max(len(p) for p in prompts)
    out_think, out_ans = [], []
    for p in prompts:
        t, v = left_pad([p], P, SP.pad)
        g = ej.generate(pa, t, ca, wa, max_new_tokens=budget, stop_tokens=(SP.end_think,), prompt_valid=v,
                        max_len=P + 40)
        n = int(g.lengths[0])
        toks = [int(x) for x in np.asarray(g.tokens[0, :n])]
        think = toks[:-1] if (g.stopped[0] and toks[-1] == SP.end_think) else toks
        t2, v2 = left_pad([p + think + [SP.end_think]], P + 20, SP.pad)
        g2 = ej.generate(pb, t2, cb, wb, max_new_tokens=max_answer, stop_tokens=(SP.eos,), prompt_valid=v2,
                         max_len=P + 40)
        out_think.append(think)
        out_ans.append([int(x) for x in np.asarray(g2.tokens[0, :int(g2.lengths[0])])])
    return out_think, out_ans


@pytest.mark.parametrize("a,b", [("50%", "100%"), ("100%", "50%"), ("50%", "50%")])
@pytest.mark.slow
def test_budget_control_equals_two_submodels_by_hand(model, prompts, a, b):
    out = budget_generate(model, prompts, think_model=a, answer_model=b, thinking_budget=10, specials=SP,
                          max_answer_tokens=5, max_thinking=16)
    think, ans = _by_hand(model, prompts, a, b, 10, 5)
    assert out.think_tokens == think
    assert out.answer_tokens == ans
    if a == "50%":   # this seed gives a mix of rows that stop by themselves and rows cut at the budget
        assert 0 < out.forced.sum() < len(prompts), out.forced


@pytest.mark.slow
def test_truncation_emits_exactly_the_budget():
    params = ej.init_params(CFG, jax.random.PRNGKey(5))
    params["lm_head"] = params["lm_head"].at[:, SP.end_think].set(0.0)    # logit 0: never the argmax here
    m = ElasticModel(CFG, params, BUDGETS)
    ev = make_eval_set(1, 4, "test", tokenizer=TOK)
    for budget in (1, 7, 13):
        out = truncation_generate(m, ev.prompts, submodel="100%", thinking_budget=budget, specials=SP,
                                  max_answer_tokens=3, max_thinking=13)
        assert all(len(t) == budget for t in out.think_tokens)
        assert all(SP.end_think not in t for t in out.think_tokens)
        assert out.forced.all()
        assert out.think.tokens == len(ev) * (budget + 1)        # thinking tokens + the forced </think>


@pytest.mark.slow
def test_truncation_continuation_matches_reprefill(model, prompts):
    """The baseline continues from its own cache; that equals re-prefilling prompt + trace."""
    out = truncation_generate(model, prompts, submodel="100%", thinking_budget=6, specials=SP, max_answer_tokens=4)
    think, ans = _by_hand(model, prompts, "100%", "100%", 6, 4)
    assert out.think_tokens == think and out.answer_tokens == ans
    assert out.answer.prefill_tokens == 0


@pytest.mark.slow
def test_sliced_mode_matches_masked(model, prompts):
    sliced = ElasticModel(model.cfg, model.params, BUDGETS, mode="sliced")
    kw = dict(think_model="50%", answer_model="100%", thinking_budget=8, specials=SP, max_answer_tokens=4)
    a, b = budget_generate(model, prompts, **kw), budget_generate(sliced, prompts, **kw)
    assert a.think_tokens == b.think_tokens and a.answer_tokens == b.answer_tokens


def test_transplant_runs_and_skips_reprefill(model, prompts):
    out = budget_generate(model, prompts, think_model="50%", answer_model="100%", thinking_budget=8, specials=SP,
                          max_answer_tokens=4, transplant=True)
    ref = budget_generate(model, prompts, think_model="50%", answer_model="100%", thinking_budget=8, specials=SP,
                          max_answer_tokens=4)
    assert out.transplant and out.answer.prefill_tokens == 0 and ref.answer.prefill_tokens > 0
    assert out.think_tokens == ref.think_tokens             # phase 1 is the same computation


def test_kept_thoughts_give_every_answering_model_the_same_results(model, prompts, monkeypatch):
    """`thoughts`: each (thinking model, budget) thinks once; the pairs answering from the kept trace
    (re-prefill, truncation continuation, transplant) give what a fresh call gives, and only a
    continuation counts the forced `</think>`'s step in its thinking latency."""
    from elastic_jax.infer import budget as budget_mod
    calls = []
    think = budget_mod._think
    monkeypatch.setattr(budget_mod, "_think", lambda *a, **k: calls.append(a[1]) or think(*a, **k))
    kw = dict(thinking_budget=7, specials=SP, max_answer_tokens=4, max_thinking=12)
    kept = {}
    for a, b, tr in [("50%", "100%", False), ("50%", "50%", False), ("50%", "100%", True), ("100%", "50%", False)]:
        out = budget_generate(model, prompts, think_model=a, answer_model=b, transplant=tr, thoughts=kept, **kw)
        ref = budget_generate(model, prompts, think_model=a, answer_model=b, transplant=tr, **kw)
        assert out.think_tokens == ref.think_tokens and out.answer_tokens == ref.answer_tokens, (a, b, tr)
        assert (out.forced == ref.forced).all() and out.think.flops == ref.think.flops
        t = kept[next(k for k in kept if k[1] == a)]
        assert out.think.latency_s == t.latency_s + (t.force_s if a == b or tr else 0.0)
    assert len(kept) == 2 and calls.count("50%") == 1 + 3 and calls.count("100%") == 1 + 1   # kept + the fresh refs
    # another budget or other prompts are another thought
    budget_generate(model, prompts[:3], think_model="50%", answer_model="100%", thoughts=kept, **kw)
    assert len(kept) == 3


def test_phase_accounting(model, prompts):
    out = budget_generate(model, prompts, think_model="50%", answer_model="100%", thinking_budget=8, specials=SP,
                          max_answer_tokens=4)
    assert out.think.latency_s > 0 and out.answer.latency_s > 0
    assert out.think.tokens == sum(len(t) + 1 for t in out.think_tokens)
    assert out.answer.tokens == sum(len(a) for a in out.answer_tokens)
    # the small model's tokens cost fewer FLOPs than the big model's, at the same context
    assert model.flops_per_token("50%", 10) < model.flops_per_token("100%", 10)
    assert out.think.flops > 0 and out.answer.flops > 0
    assert ej.param_count(CFG, BUDGETS["50%"], active=True) < ej.param_count(CFG, active=True)


def test_answer_generate_no_thinking(model, prompts):
    ans, st = answer_generate(model, [p + [SP.end_think] for p in prompts], submodel="100%", specials=SP,
                              max_answer_tokens=4)
    assert len(ans) == len(prompts) and st.tokens == sum(len(a) for a in ans)


def test_one_compiled_decode_loop_serves_both_phases(model, prompts):
    """The stop id is traced: thinking (stop at </think>) and answering (stop at EOS) of one model share
    the compiled loop at one capacity, and so does `answer_generate` given that capacity and cache."""
    from elastic_jax.infer.budget import _decode_loop_jit
    P, cap = max(len(p) for p in prompts), 13           # a capacity no other test uses
    before = _decode_loop_jit._cache_size()
    out = truncation_generate(model, prompts, submodel="50%", thinking_budget=5, specials=SP, max_answer_tokens=3,
                              max_thinking=cap)
    assert _decode_loop_jit._cache_size() == before + 1 and all(len(a) <= 3 for a in out.answer_tokens)
    answer_generate(model, [p + [SP.end_think] for p in prompts], submodel="100%", specials=SP, max_answer_tokens=3,
                    prompt_length=P + cap + 1, cache_len=P + cap + 1 + 3, capacity=cap)
    assert _decode_loop_jit._cache_size() == before + 1
    with pytest.raises(ValueError, match="capacity=2 < max_answer_tokens=3"):
        answer_generate(model, prompts, submodel="100%", specials=SP, max_answer_tokens=3, capacity=2)


def test_bad_inputs(model, prompts):
    kw = dict(specials=SP, max_answer_tokens=4)
    for bad in (0, -3):
        with pytest.raises(ValueError, match="thinking_budget must be a positive int"):
            budget_generate(model, prompts, think_model="50%", answer_model="100%", thinking_budget=bad, **kw)
    with pytest.raises(ValueError, match="'30%' is not a trained budget"):
        budget_generate(model, prompts, think_model="30%", answer_model="100%", thinking_budget=4, **kw)
    with pytest.raises(ValueError, match="'big' is not a trained budget"):
        truncation_generate(model, prompts, submodel="big", thinking_budget=4, **kw)
    with pytest.raises(ValueError, match="exceeds the context"):
        budget_generate(model, [list(range(3, 20)) * 8], think_model="50%", answer_model="50%", thinking_budget=4,
                        **kw)
    with pytest.raises(ValueError, match="max_thinking"):
        budget_generate(model, prompts, think_model="50%", answer_model="50%", thinking_budget=8, max_thinking=4, **kw)
    with pytest.raises(ValueError, match="mode must be"):
        ElasticModel(CFG, model.params, BUDGETS, mode="copy")


@pytest.mark.slow
def test_nested_checkpoint_roundtrip(tmp_path, model):
    flat = flatten(model.params)
    back = unflatten(flat)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(
        jax.tree_util.tree_map(np.asarray, model.params))
    router = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "layers": [{"b": np.ones(2, np.float32)}]}
    save_nested(str(tmp_path), CFG, model.params, BUDGETS, fractions={"100%": 1.0, "50%": 0.5}, tokenizer=TOK,
                router_params=router, elastic_cfg=ej.ElasticConfig(budgets=(1.0, 0.5)))
    cfg, params, budgets, fr = load_nested(str(tmp_path))
    assert cfg == CFG and fr == {"100%": 1.0, "50%": 0.5}
    # an HF folder: the parent opens with the HF loader, the family and router beside it
    hf_cfg, hf_params = ej.load_hf(tmp_path)
    # (its config.json is the HF spelling, the dt-limit fields excepted: elastic_jax/hf.py)
    assert hf_cfg.replace(time_step_limit=CFG.time_step_limit, time_step_min=CFG.time_step_min) == CFG
    assert_trees_equal(hf_params, params)
    assert json.load(open(tmp_path / "elastic_budgets.json"))["elastic"]["budgets"] == [1.0, 0.5]
    back = read_router(str(tmp_path))
    np.testing.assert_array_equal(back["w"], router["w"])
    np.testing.assert_array_equal(back["layers"][0]["b"], router["layers"][0]["b"])
    assert budgets["50%"].per_layer(CFG, "mamba_heads") == BUDGETS["50%"].per_layer(CFG, "mamba_heads")
    t = np.asarray([prompts_ for prompts_ in [[1, 17, 3, 18, 4, 3]]])
    np.testing.assert_allclose(ej.forward(params, t, cfg, budgets["50%"].resolve(cfg)),
                               ej.forward(model.params, t, CFG, BUDGETS["50%"].resolve(CFG)), atol=1e-6)


def test_reprefill_is_bucketed_to_the_actual_length(model, prompts):
    from elastic_jax.infer.budget import bucket_length
    assert [bucket_length(n) for n in (1, 8, 9, 16, 17)] == [8, 8, 16, 16, 24]
    with pytest.raises(ValueError, match="must be > 0"):
        bucket_length(0)
    # a large decode capacity (max_thinking) must not inflate the re-prefill: it covers the longest
    # prompt + trace + </think>, rounded up to a multiple of 8
    out = budget_generate(model, prompts, think_model="50%", answer_model="100%", thinking_budget=4, specials=SP,
                          max_answer_tokens=4, max_thinking=64, context=128)
    longest = max(len(p) + len(t) + 1 for p, t in zip(prompts, out.think_tokens))
    assert out.reprefill_length == bucket_length(longest) and out.reprefill_length % 8 == 0
    assert out.reprefill_length < max(len(p) for p in prompts) + 64 + 1
