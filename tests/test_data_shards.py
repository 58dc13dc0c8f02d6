"""Token shards (`elastic-jax tokenize`, elastic_jax/data/tokenize.py + store.py) and the streamed
training source (stream.py): chat rendering with a real template, input kinds, resume after a kill,
manifest checks, per-host disjoint rows, exact iterator resume, the token mixture, min_doc_len by
the index, and peak RSS that does not grow with the corpus."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from elastic_jax.data import DataConfig, ShardDataset, make_dataset
from elastic_jax.data import store
from elastic_jax.data import tokenize as tk

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}"
            "{{ '<|im_start|>' + m['role'] + '\\n' }}"
            "{% if m['role'] == 'assistant' and m.get('reasoning_content') %}"
            "{{ '<think>\\n' + m['reasoning_content'] + '\\n</think>\\n' }}{% endif %}"
            "{{ m['content'] + '<|im_end|>\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CHAT = [{"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "add two and two"}]
CHAT_TEXT = ("<s><|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\nadd two and two\n"
             "</think>\n4<|im_end|>\n")
ASSISTANT_TEXT = "<think>\nadd two and two\n</think>\n4<|im_end|>\n"


def _make_tokenizer(folder, corpus=("the quick brown fox jumps over the lazy dog", "What is 2+2? add two")):
    """A byte-level BPE tokenizer trained here, with chat special tokens and a think-tag template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(list(corpus) * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "chat_template": TEMPLATE}, f)
    return tok


@pytest.fixture(scope="module")
def tokdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    _make_tokenizer(str(d))
    return str(d)


def _ident():
    return {"sha256": "0" * 64, "chat_template_sha256": None, "vocab_size": 1000, "eos_id": 2, "bos_id": 1}


def _all_docs(root, with_mask=False):
    r = store.ShardReader(root)
    return [r.document(i, with_mask=with_mask) for i in range(r.num_docs)]


# --------------------------------------------------------------------------- tokenize
def test_messages_record_round_trips_through_the_chat_template(tokdir, tmp_path):
    from tokenizers import Tokenizer
    src = tmp_path / "mix.jsonl"
    src.write_text(json.dumps({"messages": CHAT}) + "\n" + json.dumps({"text": "the lazy dog"}) + "\n"
                   + "{not json\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    out = str(tmp_path / "shards")
    m = tk.tokenize([str(src)], tokdir, out, tk.TokenizeOptions(loss_mask=True), progress=False)
    tok = Tokenizer.from_file(os.path.join(tokdir, "tokenizer.json"))
    eos = tok.token_to_id("</s>")
    (chat_ids, chat_mask), (text_ids, text_mask) = _all_docs(out, with_mask=True)
    # the chat as the template writes it, thinking tags kept, special tokens as single ids
    assert tok.decode(chat_ids.tolist(), skip_special_tokens=False) == CHAT_TEXT
    assert chat_ids[0] == tok.token_to_id("<s>") and tok.token_to_id("<think>") in chat_ids
    # the loss mask: 0 on the prompt (bos, the user turn, the generation prompt), 1 on the answer
    assert tok.decode(chat_ids[chat_mask == 1].tolist(), skip_special_tokens=False) == ASSISTANT_TEXT
    assert tok.decode(chat_ids[chat_mask == 0].tolist(), skip_special_tokens=False) == CHAT_TEXT[:-len(ASSISTANT_TEXT)]
    # plain text: the tokenizer's ids plus EOS, all counted by the loss
    assert text_ids.tolist() == tok.encode("the lazy dog").ids + [eos] and text_mask.all()
    # bad JSON and a chat with no assistant turn (nothing to train on) are skipped and counted
    assert m["documents"] == 2 and m["chat_documents"] == 1 and m["bad_records"] == 2
    assert m["tokens"] == chat_ids.size + text_ids.size and m["max_token_id"] == max(chat_ids.max(), text_ids.max())
    assert m["tokenizer"]["sha256"] == store.sha256_file(os.path.join(tokdir, "tokenizer.json"))
    assert m["tokenizer"]["eos_id"] == eos
    assert sum(m["length_histogram"].values()) == 2


def test_input_kinds_text_parquet_and_datasets_folder(tokdir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(tokdir, "tokenizer.json"))
    (tmp_path / "a.txt").write_text("the quick brown fox")
    pq.write_table(pa.table({"text": ["over the", "lazy dog"]}), tmp_path / "b.parquet")
    hf = tmp_path / "hf"                              # what datasets' save_to_disk writes
    hf.mkdir()
    table = pa.table({"messages": [CHAT]})
    with pa.OSFile(str(hf / "data-00000-of-00001.arrow"), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(table)
    (hf / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (hf / "dataset_info.json").write_text("{}")
    out = str(tmp_path / "shards")
    m = tk.tokenize([str(tmp_path / "a.txt"), str(tmp_path / "b.parquet"), str(hf)], tokdir, out,
                    tk.TokenizeOptions(eos=False), progress=False)
    docs = [tok.decode(d.tolist(), skip_special_tokens=False) for d in _all_docs(out)]
    assert docs == ["the quick brown fox", "over the", "lazy dog", CHAT_TEXT]      # --no-eos: no </s>
    assert [i["documents"] for i in m["inputs"]] == [1, 2, 1]
    with pytest.raises(ValueError, match="unknown input type"):
        tk.discover([__file__])


def test_tokenize_resumes_after_a_kill(tokdir, tmp_path, monkeypatch):
    files = []
    for i in range(3):
        p = tmp_path / f"in{i}.jsonl"
        p.write_text("".join(json.dumps({"text": f"the quick fox {j} of {i}"}) + "\n" for j in range(5)))
        files.append(str(p))
    clean = str(tmp_path / "clean")
    tk.tokenize(files, tokdir, clean, progress=False)
    out = str(tmp_path / "killed")
    real, calls = tk.encode_record, [0]

    def dies_in_the_second_file(*a, **k):
        calls[0] += 1
        if calls[0] == 8:                                 # file 0 done, file 1 half written
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(tk, "encode_record", dies_in_the_second_file)
    with pytest.raises(KeyboardInterrupt):
        tk.tokenize(files, tokdir, out, progress=False)
    monkeypatch.setattr(tk, "encode_record", real)
    done0 = os.path.join(out, "parts/00000/done.json")
    assert os.path.isfile(done0) and not os.path.exists(os.path.join(out, "parts/00001/done.json"))
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    with pytest.raises(ValueError, match="did not finish"):
        ShardDataset(DataConfig(kind="shards", path=out), 1000)
    before = os.stat(done0).st_mtime_ns
    m = tk.tokenize(files, tokdir, out, progress=False)
    assert os.stat(done0).st_mtime_ns == before                   # the finished part was not redone
    assert m["documents"] == 15
    for a, b in zip(_all_docs(out), _all_docs(clean), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="inputs"):                # other inputs into the same folder
        tk.tokenize(files[:2], tokdir, out, progress=False)


def test_manifest_checked_against_the_parent(tokdir, tmp_path):
    src = tmp_path / "t.jsonl"
    src.write_text(json.dumps({"text": "the quick brown fox"}) + "\n")
    out = str(tmp_path / "shards")
    tk.tokenize([str(src)], tokdir, out, progress=False)
    ShardDataset(DataConfig(kind="shards", path=out, tokenizer_path=tokdir), 300)      # same tokenizer: fine
    other = str(tmp_path / "other")
    _make_tokenizer(other, corpus=("an entirely different corpus of words",))
    with pytest.raises(ValueError, match="another tokenizer.json"):
        ShardDataset(DataConfig(kind="shards", path=out, tokenizer_path=other), 300)
    with pytest.raises(ValueError, match="outside the model vocabulary"):
        ShardDataset(DataConfig(kind="shards", path=out), 10)
    ShardDataset(DataConfig(kind="shards", path=out, eos_id=2), 300)                  # "</s>" is id 2
    with pytest.raises(ValueError, match="end with EOS id 2"):
        ShardDataset(DataConfig(kind="shards", path=out, eos_id=5), 300)
    with pytest.raises(ValueError, match="not a token shard folder"):
        ShardDataset(DataConfig(kind="shards", path=str(tmp_path / "nothing")), 300)


# --------------------------------------------------------------------------- streaming
def _corpus(tmp_path, name, n_docs, lo, hi, base, seed=0):
    """Documents whose first token is a unique id (base + doc) and whose other tokens are base + 1000."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n_docs):
        n = int(rng.integers(lo, hi + 1))
        docs.append(np.concatenate([[base + i], np.full(n - 1, base + 1000 + i % 7)]).astype(np.int64))
    out = str(tmp_path / name)
    tk.write_documents(out, docs, _ident())
    return out, docs


def _segments(b):
    out = []
    for t, s in zip(b["tokens"], b["segment_ids"]):
        for k in np.unique(s[s > 0]):
            out.append(t[s == k])
    return out


def test_hosts_read_disjoint_rows_whose_union_is_the_one_host_stream(tmp_path):
    a, _ = _corpus(tmp_path, "a", 60, 3, 20, 0)
    b, _ = _corpus(tmp_path, "b", 40, 3, 20, 10_000)
    cfg = DataConfig(kind="shards", path=(a, b), weights=(0.7, 0.3), packing=False, seed=3)
    ds = make_dataset(cfg, 20_000)
    one = [next(s) for s in [ds.batches(32, 4, process_index=0, process_count=1)] for _ in range(6)]
    hosts = [ds.batches(32, 4, process_index=p, process_count=2) for p in range(2)]
    parts = [[next(h) for _ in range(6)] for h in hosts]
    rows_one = np.concatenate([x["tokens"] for x in one])                      # 24 rows
    rows = [np.concatenate([x["tokens"] for x in p]) for p in parts]           # 12 rows each
    np.testing.assert_array_equal(rows[0], rows_one[0::2])                      # host p: records p, p+2, ...
    np.testing.assert_array_equal(rows[1], rows_one[1::2])
    # packed: the documents each host packs are disjoint
    cfgp = DataConfig(kind="shards", path=(a, b), weights=(0.7, 0.3), seed=3)
    dsp = make_dataset(cfgp, 20_000)
    ids = []
    for p in range(2):
        h = dsp.batches(32, 4, process_index=p, process_count=2)
        ids.append({int(seg[0]) for _ in range(5) for seg in _segments(next(h)) if seg[0] < 1000 or
                    10_000 <= seg[0] < 11_000})
    assert ids[0] and ids[1] and not ids[0] & ids[1]


def test_stream_resumes_after_a_kill_with_the_exact_next_batch(tmp_path):
    a, _ = _corpus(tmp_path, "a", 50, 5, 90, 0)
    b, _ = _corpus(tmp_path, "b", 50, 5, 90, 10_000, seed=1)
    cfg = DataConfig(kind="shards", path=(a, b), weights=(0.7, 0.3), seed=5, read_threads=2)
    state_file = tmp_path / "state.json"
    script = textwrap.dedent(f"""
        import json, os, signal
        from elastic_jax.data import DataConfig, make_dataset
        ds = make_dataset(DataConfig(kind="shards", path=({a!r}, {b!r}), weights=(0.7, 0.3), seed=5,
                                     read_threads=2), 20_000)
        s = ds.batches(64, 4, epoch_seed=1, process_index=0, process_count=1)
        for i in range(7):
            next(s)
            with open({str(state_file)!r} + ".tmp", "w") as f:
                json.dump(s.get_state(), f)
            os.replace({str(state_file)!r} + ".tmp", {str(state_file)!r})
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    r = subprocess.run([sys.executable, "-c", script], env=dict(os.environ), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == -9, r.stderr
    ref = make_dataset(cfg, 20_000).batches(64, 4, epoch_seed=1, process_index=0, process_count=1)
    expected = [next(ref) for _ in range(10)][7:]
    resumed = make_dataset(cfg, 20_000).batches(64, 4, epoch_seed=1, process_index=0, process_count=1)
    resumed.set_state(json.loads(state_file.read_text()))
    for e in expected:
        got = next(resumed)
        for k in ("tokens", "segment_ids"):
            np.testing.assert_array_equal(got[k], e[k])


def test_mixture_follows_the_token_weights(tmp_path):
    a, _ = _corpus(tmp_path, "a", 400, 5, 15, 0)              # short documents
    b, _ = _corpus(tmp_path, "b", 100, 40, 80, 10_000)        # long documents
    ds = make_dataset(DataConfig(kind="shards", path=(a, b), weights=(0.7, 0.3)), 20_000)
    s = ds.batches(128, 8, process_index=0, process_count=1)
    ta = tb = 0
    for _ in range(40):
        t = next(s)["tokens"]
        ta += int(((t > 0) & (t < 10_000)).sum())
        tb += int((t >= 10_000).sum())
    assert abs(ta / (ta + tb) - 0.7) < 0.05, ta / (ta + tb)


def test_min_doc_len_selects_by_the_index_without_reading_documents(tmp_path, monkeypatch):
    out, docs = _corpus(tmp_path, "a", 300, 2, 100, 0)
    ds = make_dataset(DataConfig(kind="shards", path=out, packing=False), 2000)
    calls = {"document": 0, "longest_first": 0}
    for name in calls:
        real = getattr(store.ShardReader, name)

        def counted(self, *a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(self, *a, **k)
        monkeypatch.setattr(store.ShardReader, name, counted)
    s = ds.batches(128, 1, min_doc_len=60, process_index=0, process_count=1)
    assert calls["document"] == 0 and calls["longest_first"] <= 2 * 9 + 4        # binary search over 300
    want = {i for i, d in enumerate(docs) if d.size >= 60}
    seen = [int(next(s)["tokens"][0, 0]) for _ in range(len(want))]            # one epoch, one doc per row
    assert set(seen) == want and calls["document"] >= len(want)
    with pytest.raises(ValueError, match="no document has >= 101 tokens"):
        ds.batches(128, 1, min_doc_len=101, process_index=0, process_count=1)


RSS_SCRIPT = """
import resource, sys
from elastic_jax.data import DataConfig, make_dataset
ds = make_dataset(DataConfig(kind="shards", path=sys.argv[1], cache_mb=4, read_threads=4), 70_000)
s = ds.batches(2048, 8, process_index=0, process_count=1)
n = 0
for _ in range(int(sys.argv[2])):
    n += int((next(s)["segment_ids"] > 0).sum())
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, n)
"""


def test_peak_rss_does_not_grow_with_the_corpus(tmp_path):
    rng = np.random.default_rng(0)

    def docs(total):
        n = 0
        while n < total:
            k = int(rng.integers(200, 4000))
            n += k
            yield rng.integers(3, 65_000, size=k)
    out = {}
    for name, total in (("small", 1_000_000), ("large", 10_000_000)):
        out[name] = str(tmp_path / name)
        tk.write_documents(out[name], docs(total), _ident())
    peak = {}
    for name in out:
        r = subprocess.run([sys.executable, "-c", RSS_SCRIPT, out[name], "60"], env=dict(os.environ),
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        kb, n = map(int, r.stdout.split())
        assert n > 0.8 * 60 * 8 * 2048                                         # rows are mostly full
        peak[name] = kb / 1024
    # 10x the tokens (40 MB of uint32 more): peak RSS within a few MB
    assert peak["large"] - peak["small"] < 12, peak


def test_pod_mix_of_shards_streams_with_the_ratio(tmp_path, tokdir):
    from elastic_jax.pod import DataMix, _load_mix
    src = tmp_path / "t.jsonl"
    src.write_text(json.dumps({"text": "the quick brown fox"}) + "\n")
    r, p = str(tmp_path / "r"), str(tmp_path / "p")
    tk.tokenize([str(src)], tokdir, r, progress=False)
    tk.tokenize([str(src)], tokdir, p, progress=False)
    mix = DataMix(reasoning=DataConfig(kind="shards", path=r), pretraining=DataConfig(kind="shards", path=p),
                  reasoning_ratio=0.7)
    ds = _load_mix(mix, 300, parent_hf=tokdir)
    assert isinstance(ds, ShardDataset) and ds.config.weights == pytest.approx((0.7, 0.3)) and ds.config.paths == (r, p)
    assert next(ds.batches(16, 2, process_index=0, process_count=1))["tokens"].shape == (2, 16)
    with pytest.raises(ValueError, match="both be kind='shards'"):
        _load_mix(DataMix(reasoning=DataConfig(kind="shards", path=r), pretraining=DataConfig()), 300)


@pytest.mark.slow
def test_cli_tokenizes_in_parallel_workers(tokdir, tmp_path):
    files = []
    for i in range(3):
        p = tmp_path / f"in{i}.jsonl"
        p.write_text("".join(json.dumps({"messages": CHAT} if j % 2 else {"text": f"fox {i} {j}"}) + "\n"
                             for j in range(4)))
        files.append(str(p))
    out = str(tmp_path / "shards")
    r = subprocess.run([sys.executable, "-m", "elastic_jax.cli", "tokenize", *files, "--tokenizer", tokdir,
                        "--out", out, "--workers", "2", "--quiet"], env=dict(os.environ), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "12 documents" in r.stderr and "6 chats" in r.stderr
    serial = str(tmp_path / "serial")
    tk.tokenize(files, tokdir, serial, progress=False)
    for a, b in zip(_all_docs(out), _all_docs(serial), strict=True):        # same parts, same order
        np.testing.assert_array_equal(a, b)
    bad = subprocess.run([sys.executable, "-m", "elastic_jax.cli", "tokenize", files[0], "--tokenizer",
                          str(tmp_path), "--out", str(tmp_path / "x")], env=dict(os.environ),
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "no tokenizer.json" in bad.stderr


@pytest.mark.slow
def test_training_loop_streams_shards_and_resumes_mid_stage(tmp_path):
    """train_lm on token shards with a long-context stage selected by min_doc_len; a rerun from the
    mid-stage checkpoint reads the same batches as the uninterrupted run (the loop saves the
    stream's state)."""
    import shutil

    import jax

    import elastic_jax as ej
    from conftest import TINY
    from elastic_jax.train import OptimConfig, Stage, TrainConfig, train_lm
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 64, size=int(rng.integers(4, 40))) for _ in range(80)]
    out = str(tmp_path / "shards")
    tk.write_documents(out, docs, _ident())
    cfg = ej.NemotronHConfig(**TINY, hybrid_override_pattern="M*")
    tc = TrainConfig(stages=(Stage("short", seq_len=16, batch_size=2, steps=2),
                             Stage("long", seq_len=16, batch_size=2, steps=4, min_doc_len=17)),
                     optim=OptimConfig(lr=1e-3, warmup_steps=0), vocab_chunk=32, checkpoint_every=4,
                     async_checkpointing=False, tensorboard=False, plot=False)
    p0 = ej.init_params(cfg, jax.random.PRNGKey(0))
    run = tmp_path / "run"
    res = train_lm(cfg, tc, p0, DataConfig(kind="shards", path=out), run, progress=False)
    assert res.steps == 6 and res.tokens_seen > 0
    digests = [json.loads(l) for l in (run / "batches.jsonl").read_text().splitlines()]
    shutil.rmtree(run / "checkpoints" / "6")                    # as if killed after step 4's checkpoint
    (run / "batches.jsonl").unlink()
    again = train_lm(cfg, tc, p0, DataConfig(kind="shards", path=out), run, progress=False)
    assert again.resumed_from == 4
    resumed = [json.loads(l) for l in (run / "batches.jsonl").read_text().splitlines()]
    assert [d["sha1"] for d in resumed] == [d["sha1"] for d in digests if d["step"] >= 4]


def test_shards_at_a_url_stream_like_local_ones(tmp_path):
    """gs:// paths become TensorStore's gcs kvstore; `memory://` (the same URL path, no network)
    stands in for a bucket end to end."""
    import tensorstore as ts
    spec = ts.Spec({"driver": "zarr3", "kvstore": store.kvstore(store.join("gs://bkt/tok/reasoning", "index"))})
    assert spec.to_json()["kvstore"] == {"driver": "gcs", "bucket": "bkt", "path": "tok/reasoning/index/"}
    docs = [np.arange(3, 30), np.arange(40, 45), np.arange(50, 90)]
    tk.write_documents("memory://bkt/tok", docs, _ident())
    local = str(tmp_path / "tok")
    tk.write_documents(local, docs, _ident())
    got = [next(make_dataset(DataConfig(kind="shards", path=p, seed=2), 100).batches(
        32, 2, process_index=0, process_count=1)) for p in ("memory://bkt/tok", local)]
    np.testing.assert_array_equal(got[0]["tokens"], got[1]["tokens"])
    with pytest.raises(ValueError, match="already holds token shards"):
        tk.write_documents(local, docs, _ident())


@pytest.mark.slow
def test_prefetch_workers_stream_deterministically_and_resume_exactly(tmp_path):
    """grain mp_prefetch: each worker packs its own slice, so the rows depend on the worker count
    (part of the DataConfig the checkpoint compares) but not on the run; the state resumes exactly."""
    out, _ = _corpus(tmp_path, "a", 120, 5, 90, 0)
    cfg = DataConfig(kind="shards", path=out, prefetch_workers=2, read_threads=2)

    def stream():
        return make_dataset(cfg, 20_000).batches(64, 4, process_index=0, process_count=1)
    ref = stream()
    expected = [next(ref)["tokens"] for _ in range(6)]
    s = stream()
    for e in expected[:3]:
        np.testing.assert_array_equal(next(s)["tokens"], e)
    state = json.loads(json.dumps(s.get_state()))
    resumed = stream()
    resumed.set_state(state)
    for e in expected[3:]:
        np.testing.assert_array_equal(next(resumed)["tokens"], e)
