"""Data pipeline: sources (synthetic, arrays, jsonl, parquet with a local tokenizer.json), packing
with segment ids, per-host sharding, checkpointable iterator, bad input."""
import json

import numpy as np
import pytest

from elastic_jax.data import DataConfig, make_dataset


def _segments(row_tokens, row_seg):
    out = []
    for s in np.unique(row_seg[row_seg > 0]):
        idx = np.nonzero(row_seg == s)[0]
        assert np.all(np.diff(idx) == 1), "a segment must be contiguous"
        out.append(row_tokens[idx])
    return out


def _docs():
    rng = np.random.default_rng(0)
    return [rng.integers(3, 60, size=int(rng.integers(2, 30))).astype(np.int32) for _ in range(40)]


def test_packing_keeps_documents_whole_and_marks_boundaries():
    docs = _docs() + [np.arange(3, 3 + 50, dtype=np.int32)]          # one longer than the row
    ds = make_dataset(DataConfig(kind="arrays", seed=1), vocab_size=64, documents=docs)
    stream = ds.batches(seq_len=16, batch_size=4, process_index=0, process_count=1)
    pieces = {tuple(d[s:s + 16]) for d in docs for s in range(0, len(d), 16)}
    seen = set()
    for _ in range(12):
        b = next(stream)
        assert b["tokens"].shape == (4, 16) and b["segment_ids"].dtype == np.int32
        assert np.all(b["tokens"][b["segment_ids"] == 0] == 0)         # padding is pad id 0
        for row_t, row_s in zip(b["tokens"], b["segment_ids"]):
            for seg in _segments(row_t, row_s):
                assert tuple(seg) in pieces                            # a whole document (piece)
                seen.add(tuple(seg))
    assert len(seen) > 20


def test_unpacked_rows_hold_one_document():
    ds = make_dataset(DataConfig(kind="arrays", packing=False, shuffle=False), 64, documents=_docs())
    b = next(ds.batches(32, 4, process_index=0, process_count=1))
    assert set(np.unique(b["segment_ids"])) <= {0, 1}
    np.testing.assert_array_equal(b["tokens"][0][b["segment_ids"][0] > 0], _docs()[0])


def test_iterator_state_resumes_exactly():
    ds = make_dataset(DataConfig(num_documents=50, synthetic_vocab=64), 64)
    s1 = ds.batches(24, 2, epoch_seed=3, process_index=0, process_count=1)
    for _ in range(5):
        next(s1)
    state = json.loads(json.dumps(s1.get_state()))                      # JSON round trip (checkpoint meta)
    expected = [next(s1) for _ in range(4)]
    s2 = ds.batches(24, 2, epoch_seed=3, process_index=0, process_count=1)
    s2.set_state(state)
    for e in expected:
        got = next(s2)
        np.testing.assert_array_equal(got["tokens"], e["tokens"])
        np.testing.assert_array_equal(got["segment_ids"], e["segment_ids"])


def test_per_host_sharding_splits_documents_and_rows():
    docs = [np.full((5,), 3 + i, np.int32) for i in range(20)]          # every document is distinct
    ds = make_dataset(DataConfig(kind="arrays", packing=False, seed=0), 64, documents=docs)
    firsts = []
    for p in range(2):
        b = next(ds.batches(8, 4, process_index=p, process_count=2))
        assert b["tokens"].shape == (2, 8)
        firsts.append({int(t) for t in b["tokens"][:, 0]})
    assert not firsts[0] & firsts[1]
    with pytest.raises(ValueError, match="divisible by the number of hosts"):
        ds.batches(8, 3, process_index=0, process_count=2)


def test_token_ids_beyond_vocab_are_rejected():
    with pytest.raises(ValueError, match=r"document 1 holds token id 70 .*vocab_size=64"):
        make_dataset(DataConfig(kind="arrays"), 64, documents=[[3, 4], [5, 70, 6]])
    with pytest.raises(ValueError, match="needs documents="):
        make_dataset(DataConfig(kind="arrays"), 64)


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<pad>", "<unk>", "</s>"])
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20 + ["pack my box with jugs"] * 20,
                            trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return str(path), tok


def test_jsonl_malformed_lines_skipped_and_counted_or_error(tmp_path, tokenizer_json):
    tok_path, tok = tokenizer_json
    f = tmp_path / "train.jsonl"
    f.write_text("\n".join([json.dumps({"text": "the quick brown fox"}), "{not json", json.dumps({"body": "x"}),
                            json.dumps({"text": 5}), "", json.dumps({"text": "pack my box"})]) + "\n")
    cfg = DataConfig(kind="jsonl", path=str(f), tokenizer_path=tok_path, eos_id=2)
    ds = make_dataset(cfg, vocab_size=tok.get_vocab_size())
    assert ds.stats.documents == 2 and ds.stats.bad_lines == 3
    np.testing.assert_array_equal(ds.documents[0], tok.encode("the quick brown fox").ids + [2])
    with pytest.raises(ValueError, match=r"train.jsonl:2: malformed JSON"):
        make_dataset(cfg.replace(on_bad_line="error"), vocab_size=tok.get_vocab_size())
    with pytest.raises(ValueError, match="outside the model vocabulary"):
        make_dataset(cfg, vocab_size=10)


def test_parquet_source(tmp_path, tokenizer_json):
    import pyarrow as pa
    import pyarrow.parquet as pq
    tok_path, tok = tokenizer_json
    f = tmp_path / "train.parquet"
    pq.write_table(pa.table({"text": ["the lazy dog", None, "jumps over"]}), f)
    ds = make_dataset(DataConfig(kind="parquet", path=str(f), tokenizer_path=tok_path), tok.get_vocab_size())
    assert ds.stats.documents == 2 and ds.stats.bad_lines == 1
    with pytest.raises(ValueError, match="no column 'content'"):
        make_dataset(DataConfig(kind="parquet", path=str(f), tokenizer_path=tok_path, text_field="content"), 200)


def test_config_errors():
    with pytest.raises(ValueError, match="DataConfig.kind"):
        DataConfig(kind="csv")
    with pytest.raises(ValueError, match="DataConfig.tokenizer_path"):
        DataConfig(kind="jsonl", path="x.jsonl")
    with pytest.raises(ValueError, match="DataConfig.on_bad_line"):
        DataConfig(on_bad_line="ignore")
    with pytest.raises(ValueError, match="does not exist"):
        make_dataset(DataConfig(kind="jsonl", path="/nonexistent.jsonl", tokenizer_path=__file__), 10)
