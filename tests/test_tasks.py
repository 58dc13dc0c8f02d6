"""The embedded reasoning task: determinism, disjoint splits, trace/answer semantics, exact-match
checker round trip, and the tokenizer (tokenizer.json save/load)."""
import numpy as np
import pytest

from elastic_jax.tasks import (ANSWER, END_THINK, EOS, Problem, TaskTokenizer, answer_text, check_answer,
                               document_text, make_documents, make_eval_set, make_problems, parse_answer,
                               prompt_text, split_of, trace_text)


def test_deterministic_and_seeded():
    assert make_problems(3, 50) == make_problems(3, 50)
    assert make_problems(3, 50) != make_problems(4, 50)
    assert make_documents(0, 20) == make_documents(0, 20)


def test_splits_are_disjoint():
    train = {p.digits for p in make_problems(0, 3000, "train")}
    test = {p.digits for p in make_problems(0, 600, "test")}
    assert train and test and not (train & test)
    assert all(split_of(Problem(d)) == "test" for d in test)


def test_difficulty_levels():
    for level in (1, 2, 3, 4):
        ps = make_problems(1, 40, difficulty=level)
        assert {p.difficulty for p in ps} == {level}
        assert {len(p.digits) for p in ps} == {level + 2}
    assert {p.difficulty for p in make_problems(1, 400)} == {1, 2, 3, 4}


def test_answer_needs_the_whole_trace():
    p = Problem((3, 7, 2, 9))
    assert trace_text(p) == "a 0 3 3 b 3 7 0 ! c 0 2 2 d 2 9 1 !"
    assert p.answer() == "2 1"                                 # 21 = two carries, last running value 1
    for p in make_problems(2, 300):
        total = sum(p.digits)
        carries = trace_text(p).split().count("!")
        last = int(trace_text(p).split()[-1] if not trace_text(p).endswith("!") else trace_text(p).split()[-2])
        assert p.answer() == f"{total // 10} {total % 10}" == f"{carries} {last}"
    # the answer is not a copy of the trace's last line: the tens digit counts carries over all steps
    differs = [p for p in make_problems(2, 300) if p.answer().split()[0] != "0"]
    assert len(differs) > 100


def test_checker_round_trip():
    for p in make_problems(5, 100):
        doc = document_text(p)
        assert check_answer(p, doc)
        assert parse_answer(doc) == p.answer()
        wrong = doc.replace(f"{ANSWER} {p.answer()}", f"{ANSWER} {(int(p.answer()[0]) + 1) % 10} {p.answer()[2]}")
        assert not check_answer(p, wrong)
    p = Problem((1, 2, 3))
    assert not check_answer(p, "a 0 1 1 </think>")              # no answer marker
    assert check_answer(p, f"{ANSWER} 0 6 {EOS} <pad> <pad>")   # trailing padding ignored
    assert not check_answer(p, f"{ANSWER} 0 6 7 {EOS}")         # exact match, no extra tokens


def test_tokenizer_round_trip(tmp_path):
    tok = TaskTokenizer.default()
    assert tok.vocab_size <= 512
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    path = tok.save(tmp_path)
    assert path.endswith("tokenizer.json")
    tok2 = TaskTokenizer.load(tmp_path)
    for p in make_problems(0, 30):
        ids = tok.encode(document_text(p))
        assert tok2.encode(document_text(p)) == ids
        assert tok.decode(ids) == document_text(p)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and tok.end_think_id in ids
    docs = make_documents(0, 500)
    assert max(len(d) for d in docs) <= 128
    assert all(max(d) < tok.vocab_size for d in docs)


def test_eval_set():
    ev = make_eval_set(7, 30, "test", difficulty=(1, 4))
    tok = TaskTokenizer.default()
    assert len(ev) == 30 and all(p[-1] == tok.think_id for p in ev.prompts)
    assert all(tok.decode(pr) == prompt_text(p) for pr, p in zip(ev.prompts, ev.problems))
    assert ev.trace_lengths == tuple(len(trace_text(p).split()) for p in ev.problems)
    assert answer_text(ev.problems[0]).startswith(END_THINK)


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="split must be one of"):
        make_problems(0, 3, "dev")
    with pytest.raises(ValueError, match="difficulty must be"):
        make_problems(0, 3, difficulty=0)
    with pytest.raises(ValueError, match="n must be >= 0"):
        make_problems(0, -1)
    with pytest.raises(ValueError, match="Problem.digits"):
        Problem((1, 12, 3))
    with pytest.raises(ValueError, match="outside the task vocabulary"):
        TaskTokenizer.default().encode("a 3 banana")
    with pytest.raises(FileNotFoundError):
        TaskTokenizer.load(tmp_path / "missing")


# ------------------------------------------------------------------ query levels (issue 15)
def test_query_levels_trace_lengths_and_answer():
    from elastic_jax.tasks import QUERY_LEVELS
    tok = TaskTokenizer.default()
    for level, (k, q) in QUERY_LEVELS.items():
        ps = make_problems(1, 60, difficulty=level)
        assert {p.difficulty for p in ps} == {level} and {(len(p.digits), len(p.query)) for p in ps} == {(k, q)}
        lens = [len(tok.encode(trace_text(p))) for p in ps]
        assert 4 * k <= min(lens) and max(lens) <= 5 * k                 # 4 tokens a step, + `!` on a carry
    longest = max(len(tok.encode(trace_text(p))) for p in make_problems(2, 300, difficulty=8))
    assert 90 <= longest <= 100                                            # the hardest level: ~100 tokens
    p = Problem((3, 7, 2, 9, 1, 1, 1, 1), query=(1, 3))
    assert prompt_text(p) == "<bos> a 3 b 7 c 2 d 9 e 1 f 1 g 1 h 1 ? b d <think>"
    assert p.answer() == "b 0 d 1" and p.difficulty == 5                  # running values after b and d
    # every queried value is the running sum mod 10 up to that step, readable off the trace
    for p in make_problems(3, 200, difficulty=(5, 6, 7, 8)):
        words = trace_text(p).split()
        for part, i in zip(p.answer_parts(), p.query):
            tag, value = part.split()
            assert int(value) == sum(p.digits[:i + 1]) % 10
            assert words[words.index(tag) + 3] == value
    # the query levels need the extra tags and `?`; the sum levels keep their old ids (< 26)
    from elastic_jax.tasks import vocab_needed
    assert vocab_needed() == 26 and vocab_needed((5, 6, 7, 8)) == tok.vocab_size - 1 == 39   # `+`: combine only
    assert max(max(d) for d in make_documents(0, 200)) < 26


def test_partial_credit_per_queried_step():
    from elastic_jax.tasks import score_answer
    p = Problem((3, 7, 2, 9, 1, 1, 1, 1, 0, 0, 0, 0), query=(0, 1, 3))     # a 3, b 0, d 1
    assert p.answer() == "a 3 b 0 d 1"
    assert score_answer(p, f"{ANSWER} a 3 b 0 d 1 {EOS}") == 1.0 and check_answer(p, f"{ANSWER} a 3 b 0 d 1")
    assert score_answer(p, f"{ANSWER} a 3 b 5 d 1 {EOS}") == pytest.approx(2 / 3)
    assert score_answer(p, f"{ANSWER} a 3 {EOS}") == pytest.approx(1 / 3)                # stopped early
    assert score_answer(p, f"{ANSWER} a 3 b 0 d 1 e 1 {EOS}") == pytest.approx(3 / 4)    # extra parts cost
    assert score_answer(p, f"{ANSWER} b 0 a 3 d 1 {EOS}") == pytest.approx(1 / 3)        # in the query's order
    assert score_answer(p, "a 0 3 3 </think>") == 0.0                                      # no answer marker
    assert not check_answer(p, f"{ANSWER} a 3 b 5 d 1 {EOS}")
    q = Problem((1, 2, 3))                                       # the sum levels: one part, 0 or 1
    assert score_answer(q, f"{ANSWER} 0 6 {EOS}") == 1.0
    assert score_answer(q, f"{ANSWER} 0 7 {EOS}") == score_answer(q, f"{ANSWER} 0 6 7 {EOS}") == 0.0


def test_query_documents_round_trip_and_splits():
    tok = TaskTokenizer.default()
    ps = make_problems(4, 100, difficulty=(5, 6, 7, 8))
    for p in ps:
        ids = tok.encode(document_text(p))
        assert tok.decode(ids) == document_text(p) and check_answer(p, document_text(p))
    train = set(make_problems(0, 2000, "train", difficulty=5))
    test = set(make_problems(0, 400, "test", difficulty=5))
    assert test and not (train & test) and all(split_of(p) == "test" for p in test)
    docs = make_documents(0, 300, difficulty=(1, 8))
    assert max(len(d) for d in docs) <= 160                      # the main job's rows hold whole documents
    with pytest.raises(ValueError, match="matches no query level"):
        Problem((1, 2, 3, 4), query=(0,))
    with pytest.raises(ValueError, match="distinct sorted step indices"):
        Problem(tuple(range(8)), query=(3, 1))
    with pytest.raises(ValueError, match="difficulty must be"):
        make_problems(0, 3, difficulty=17)


def test_truncation_degrades_the_query_score_gracefully():
    """An answerer that reads each queried value off whatever trace it is given (and guesses 0 for a
    step the trace did not reach) scores in proportion to the steps reached: accuracy takes many
    values across thinking budgets (not the sum levels' cliff at the full trace)."""
    from elastic_jax.tasks import score_answer
    tok = TaskTokenizer.default()

    def oracle(p, trace_words):
        parts = []
        for i in p.query:
            tag = "abcdefghijklmnopqrst"[i]
            j = trace_words.index(tag) if tag in trace_words else -1
            parts.append(f"{tag} {trace_words[j + 3] if 0 <= j and j + 3 < len(trace_words) else 0}")
        return f"{ANSWER} {' '.join(parts)} {EOS}"

    def mean_score(probs, budget, scorer):
        return float(np.mean([scorer(p, oracle(p, tok.decode(tok.encode(trace_text(p))[:budget]).split()))
                              for p in probs]))

    query = make_problems(5, 200, "test", difficulty=(5, 6, 7, 8))
    budgets = (16, 32, 48, 64, 80, 104)
    partial = [mean_score(query, b, score_answer) for b in budgets]
    exact = [mean_score(query, b, check_answer) for b in budgets]
    assert partial == sorted(partial) and partial[-1] == 1.0 and partial[0] < 0.5
    assert len({round(s, 3) for s in partial}) == len(budgets)       # a distinct value per budget
    assert all(s >= e for s, e in zip(partial, exact)) and partial[2] > exact[2] + 0.1


def test_data_and_main_job_configs_take_the_query_levels():
    from elastic_jax.data import DataConfig
    from elastic_jax.experiment import load_experiment
    cfg = DataConfig(kind="task", num_documents=20, task_levels=[8])
    assert cfg.task_levels == (8,)
    from elastic_jax.data.pipeline import task_documents
    assert all(len(d) > 100 and TaskTokenizer.default().id("?") in d for d in task_documents(cfg))
    with pytest.raises(ValueError, match="DataConfig.task_levels"):
        DataConfig(kind="task", task_levels=(0,))
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    xp = load_experiment(os.path.join(root, "experiments", "tiny_star_elastic_query.py"), quick=True)
    assert xp.eval.levels == (5, 6, 7, 8) and xp.eval.full_thinking >= 100 and xp.model.vocab_size >= 39
    with pytest.raises(ValueError, match="use token ids up to 38"):
        import dataclasses
        dataclasses.replace(xp, model=dataclasses.replace(xp.model, vocab_size=32))


def test_tokenizer_for_the_sum_levels_is_the_original():
    full, sums = TaskTokenizer.default(), TaskTokenizer.default((1, 2, 3, 4))
    assert sums.vocab_size == 26 and full.vocab_size == 40       # a vocab-32 model serves the sum levels
    for p in make_problems(0, 20):
        assert sums.encode(document_text(p)) == full.encode(document_text(p))
    assert TaskTokenizer.default((4, 5)).vocab_size == 40


# ------------------------------------------------------------------ recurrence levels (issue 15)
def test_recurrence_trace_is_local_and_the_answer_recalls_it():
    from elastic_jax.tasks import RECURRENCE_LEVELS, score_answer
    tok = TaskTokenizer.default()
    p = Problem((3, 7), query=(3, 5), recurrence=8)
    assert prompt_text(p) == "<bos> ? d f a 3 b 7 <think>"
    assert trace_text(p) == "c 3 7 0 d 7 0 7 e 0 7 7 f 7 7 4 g 7 4 1 h 4 1 5"
    assert p.answer() == "d 7 f 4" and p.difficulty == 9
    for level, (k, q) in RECURRENCE_LEVELS.items():
        for p in make_problems(6, 100, difficulty=level):
            assert (p.difficulty, p.recurrence, len(p.query)) == (level, k, q) and min(p.query) >= 2
            prompt, words = prompt_text(p).split(), trace_text(p).split()
            assert len(words) == 4 * (k - 2) == len(tok.encode(trace_text(p)))
            steps = [words[i:i + 4] for i in range(0, len(words), 4)]
            assert [s[0] for s in steps] == list("abcdefghijklmnopqrst"[2:k])
            # locality: a step copies the two values before it (the start values: fixed prompt
            # positions just before `<think>`) and adds them mod 10
            prev = [prompt[-4], prompt[-2]]
            for tag, a, b, x in steps:
                assert [a, b] == prev and int(x) == (int(a) + int(b)) % 10
                prev = [b, x]
            # the answer: the value at each queried step, read off the finished trace
            assert p.answer_parts() == [f"{steps[i - 2][0]} {steps[i - 2][3]}" for i in p.query]
            assert score_answer(p, document_text(p)) == 1.0
    p = Problem((3, 7), query=(3, 5, 8), recurrence=14)           # d 7, f 4, i 6
    assert score_answer(p, f"{ANSWER} d 7 f 0 i 6 {EOS}") == pytest.approx(2 / 3)
    assert score_answer(p, f"{ANSWER} d 7 {EOS}") == pytest.approx(1 / 3)
    docs = make_documents(0, 400, difficulty=(9, 10, 11, 12))
    assert max(len(d) for d in docs) <= 80                        # the main job's 96-token rows hold them
    from elastic_jax.tasks import vocab_needed
    assert vocab_needed((9, 10, 11, 12)) == 39
    train = set(make_problems(0, 2000, "train", difficulty=12))
    test = set(make_problems(0, 300, "test", difficulty=12))
    assert test and not (train & test) and all(split_of(p) == "test" for p in test)
    with pytest.raises(ValueError, match="recurrence Problem"):
        Problem((3, 7, 1), query=(3, 5), recurrence=8)
    with pytest.raises(ValueError, match="queries steps 2"):
        Problem((3, 7), query=(1, 5), recurrence=8)


def test_combine_answer_digit_gathers_each_group_of_queried_values():
    from elastic_jax.tasks import COMBINE_LEVELS, score_answer, vocab_needed
    p = Problem((3, 7), query=(2, 3, 4, 5), recurrence=8, per_part=2)
    assert prompt_text(p) == "<bos> ? c d + e f a 3 b 7 <think>"
    assert trace_text(p) == trace_text(Problem((3, 7), query=(3, 5), recurrence=8))   # the recurrence walk
    assert p.answer() == "c d 7 e f 1" and p.difficulty == 13      # 0 + 7; 7 + 4 = 11 -> 1
    assert score_answer(p, f"{ANSWER} c d 7 e f 0 {EOS}") == 0.5 and score_answer(p, f"{ANSWER} c d 7 {EOS}") == 0.5
    assert score_answer(p, f"{ANSWER} c d 7 e f 1 g h 5 {EOS}") == pytest.approx(2 / 3)   # an extra part costs credit
    for level, (k, parts, per) in COMBINE_LEVELS.items():
        for p in make_problems(7, 100, difficulty=level):
            assert (p.difficulty, p.recurrence, len(p.query), p.per_part) == (level, k, parts * per, per)
            values = dict(zip(trace_text(p).split()[::4], trace_text(p).split()[3::4]))
            groups = prompt_text(p).split(" ? ")[1].split(" a ")[0].split(" + ")
            assert len(groups) == parts and all(len(g.split()) == per for g in groups)
            assert p.answer_parts() == [f"{g} {sum(int(values[t]) for t in g.split()) % 10}" for g in groups]
            assert score_answer(p, document_text(p)) == 1.0
    docs = make_documents(0, 400, difficulty=tuple(COMBINE_LEVELS))
    assert max(len(d) for d in docs) <= 92                        # the main job's 96-token rows hold them
    assert vocab_needed(tuple(COMBINE_LEVELS)) == 40
    train = set(make_problems(0, 2000, "train", difficulty=16))
    test = set(make_problems(0, 300, "test", difficulty=16))
    assert test and not (train & test) and all(split_of(p) == "test" for p in test)
    with pytest.raises(ValueError, match="combine Problem"):
        Problem((3, 7), query=(2, 3, 4), recurrence=8, per_part=2)


def test_truncation_degrades_the_recurrence_score_gracefully():
    """A reader of whatever trace it is given (guessing 0 where the trace did not reach) scores
    several distinct, increasing values across the main job's thinking budgets."""
    from elastic_jax.tasks import score_answer
    tok = TaskTokenizer.default()

    def read(p, words):
        tags = "abcdefghijklmnopqrst"
        got = {words[j]: words[j + 3] for j in range(0, len(words) - 3, 4)}
        return f"{ANSWER} {' '.join(f'{tags[i]} {got.get(tags[i], 0)}' for i in p.query)} {EOS}"

    probs = make_problems(5, 200, "test", difficulty=(9, 10, 11, 12))
    budgets = (8, 16, 24, 32, 40, 48, 56)
    scores = [float(np.mean([score_answer(p, read(p, tok.decode(tok.encode(trace_text(p))[:b]).split()))
                             for p in probs])) for b in budgets]
    exact = [float(np.mean([check_answer(p, read(p, tok.decode(tok.encode(trace_text(p))[:b]).split()))
                            for p in probs])) for b in budgets]
    assert scores == sorted(scores) and scores[-1] == 1.0 and scores[0] < 0.4
    assert len({round(s, 3) for s in scores}) == len(budgets)
    assert all(s >= e for s, e in zip(scores, exact)) and scores[1] > exact[1] + 0.1


def test_main_job_defaults_to_the_combine_levels_and_keeps_the_other_tasks():
    import os
    from elastic_jax.experiment import load_experiment
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
    from elastic_jax.tasks import make_eval_set
    for quick in (False, True):
        xp = load_experiment(os.path.join(root, "tiny_star_elastic.py"), quick=quick)
        assert xp.data.task_levels == (13, 14, 15, 16) and set(xp.eval.levels) <= set(xp.data.task_levels)
        # two attention layers for the answer's lookups (--quick: one layer of each kind, a smoke run)
        assert xp.model.hybrid_override_pattern == ("M*E" if quick else "M*EM*E")
        assert xp.parent_train.stages[0].seq_len >= 90                   # whole documents (<= 89 tokens)
        assert xp.parent_train.stages[0].steps == (40 if quick else 1000)
        # issue 30: 3 seeds x 300 problems (the seed variance dominates the verdict's interval); the grid
        # keeps 150 (--quick: 1 seed, all 32); quantization off in both (on with --set quant.enabled=true);
        # each smaller size from scratch for a quarter of the parent's steps (not in --quick)
        assert (xp.eval.n_problems, xp.eval.grid_problems) == ((32, None) if quick else (300, 150))
        assert xp.seeds == (1 if quick else 3) and not xp.quant.enabled
        assert xp.scratch_steps == (0 if quick else 248)
        es = make_eval_set(0, 100, "test", xp.eval.levels)
        assert max(es.trace_lengths) <= xp.eval.full_thinking            # "full thinking" holds every trace
        # each problem's answer fits the answer budget: `<ans>`, per pair its two tags and the sum, `<eos>`
        assert max(2 + len(p.answer().split()) for p in es.problems) <= xp.eval.max_answer_tokens
    assert xp.eval.levels == (13, 14) and xp.eval.full_thinking == 56 - 20 and xp.eval.max_answer_tokens == 8
    # --quick's grid decodes no more tokens than the sum task's (4 budgets x (32 + 6) per problem)
    assert len(xp.eval.thinking_budgets) * (xp.eval.full_thinking + xp.eval.max_answer_tokens) <= 4 * (32 + 6)
    xp = load_experiment(os.path.join(root, "tiny_star_elastic_recurrence.py"))
    assert xp.data.task_levels == (9, 10, 11, 12) and xp.parent_train.stages[0].steps == 250
    xp = load_experiment(os.path.join(root, "tiny_star_elastic_sum.py"))
    assert xp.data.task_levels is None and xp.eval.levels == (1, 2, 3, 4) and xp.model.vocab_size == 32


def test_no_test_walk_appears_in_the_main_jobs_training_documents():
    """issue 30: the main job's test walks (start pairs) are held out: no tagged trace step of any eval
    problem occurs in any of its training documents, so every scoring unit is unseen."""
    import os
    from elastic_jax.experiment import load_experiment
    from elastic_jax.tasks import make_documents, scoring_units, unit_seen
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
    xp = load_experiment(os.path.join(root, "tiny_star_elastic.py"))
    ev = xp.eval
    test = make_problems(ev.seed, ev.n_problems, ev.split, ev.levels)
    train = make_problems(xp.data.seed, xp.data.num_documents, xp.data.task_split, xp.data.task_levels)
    tok = TaskTokenizer.default()
    assert tok.decode(make_documents(xp.data.seed, 5, xp.data.task_split, xp.data.task_levels, tokenizer=tok)[0]) \
        == document_text(train[0])                                      # these are the training documents
    walk_steps = lambda p: {" ".join(w) for w in zip(*[iter(trace_text(p).split())] * 4)}   # "c 3 7 0", ...
    train_steps = set().union(*(walk_steps(p) for p in train))
    test_steps = set().union(*(walk_steps(p) for p in test))
    assert test_steps and train_steps and not (test_steps & train_steps)
    assert not {p.digits for p in test} & {p.digits for p in train}
    assert not any(any(s) for s in unit_seen(test, train))
    # the unit bookkeeping finds overlap where there is some: the old problem-level split of the
    # recurrence levels shared walks (and most units) between the splits
    same_walk = [Problem(p.digits, (2, 3, 4, 5), p.recurrence, p.per_part) for p in train[:50]
                 if p.difficulty == 13]
    assert same_walk and all(all(s) for s in unit_seen(same_walk, train))
    assert scoring_units(Problem((3, 7), (2, 3, 4, 5), 8, 2)) == [((3, 7), (2, 3)), ((3, 7), (4, 5))]


def test_part_scores_agree_with_score_answer():
    from elastic_jax.tasks import part_scores, score_answer
    p = Problem((3, 7), query=(2, 3, 4, 5), recurrence=8, per_part=2)               # c d 7 e f 1
    assert part_scores(p, f"{ANSWER} c d 7 e f 0 {EOS}") == [1.0, 0.0]
    assert part_scores(p, f"{ANSWER} c d 7 {EOS}") == [1.0, 0.0]
    assert part_scores(p, "no answer") == [0.0, 0.0]
    for q in make_problems(3, 200, "test", (13, 14, 15, 16)):
        for text in (document_text(q), f"{ANSWER} {q.answer()[:-1]}9 {EOS}", f"{ANSWER} {q.answer_parts()[0]} {EOS}"):
            ps = part_scores(q, text)
            assert len(ps) == len(q.answer_parts())
            assert score_answer(q, text) == pytest.approx(sum(ps) / len(ps))


def test_paper_budgets_variant_targets_total_and_active_and_feeds_the_long_stage_long_documents():
    """issue 30: both cost targets, stage 2 only on documents longer than stage 1's rows (and some exist)."""
    import os
    from elastic_jax.data import make_dataset
    from elastic_jax.experiment import load_experiment
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
    for quick in (False, True):
        xp = load_experiment(os.path.join(root, "tiny_star_elastic_paper_budgets.py"), quick=quick)
        assert {t.cost_kind for t in xp.elastic.targets()} == {"total", "active"}
        s1, s2 = xp.elastic_train.stages
        assert s2.min_doc_len == s1.seq_len + 1 and s2.seq_len >= 89
        default = load_experiment(os.path.join(root, "tiny_star_elastic.py"), quick=quick)
        assert default.elastic.budget_targets is None and default.elastic_train.stages[1].min_doc_len is None
    data = make_dataset(xp.data, xp.model.vocab_size)
    batch = next(data.batches(s2.seq_len, s2.batch_size, min_doc_len=s2.min_doc_len))
    seg = np.asarray(batch["segment_ids"])
    lengths = [int((row == k).sum()) for row in seg for k in set(row.tolist()) - {0}]
    assert lengths and min(lengths) >= s2.min_doc_len
