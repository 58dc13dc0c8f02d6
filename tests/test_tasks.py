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
        make_problems(0, 3, difficulty=7)
    with pytest.raises(ValueError, match="n must be >= 0"):
        make_problems(0, -1)
    with pytest.raises(ValueError, match="Problem.digits"):
        Problem((1, 12, 3))
    with pytest.raises(ValueError, match="outside the task vocabulary"):
        TaskTokenizer.default().encode("a 3 banana")
    with pytest.raises(FileNotFoundError):
        TaskTokenizer.load(tmp_path / "missing")
