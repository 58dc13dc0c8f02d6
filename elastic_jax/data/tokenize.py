"""`elastic-jax tokenize`: text, jsonl, parquet and Hugging Face `datasets` folders -> token shards.

    elastic-jax tokenize data/reasoning/*.jsonl --tokenizer /ckpt/parent --out gs://bucket/tok/reasoning
    elastic-jax tokenize data/web.parquet data/hf_saved/ --tokenizer /ckpt/parent --out tok/pretraining

The tokenizer is the parent's HF folder (tokenizer.json, tokenizer_config.json's chat template and
special tokens, or chat_template.jinja). A record with a `messages` list (role / content, optional
reasoning_content) is rendered with the parent's chat template, thinking tags kept, and encoded
without added special tokens (the template writes them); a record with `text` is encoded with the
tokenizer's own special tokens plus EOS (unless `--no-eos`). `--loss-mask` stores beside the tokens
a mask that is 0 on prompt tokens of chats (the rendered text before each assistant turn, found by
rendering the conversation's prefixes) and 1 elsewhere.

One input file (or one arrow file of a `datasets` folder) = one part, written by one worker
(`--workers`); a finished part has `done.json`, so rerunning the same command after a kill skips
finished parts and redoes the rest. `manifest.json` is written last (store.py).

This module renders chats with `infer.chat.ChatTokenizer` (the same renderer generation uses), so it
sits in the entry-point layer beside `infer`; the training side (store.py, stream.py) does not import it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np

from ..infer.chat import ChatTokenizer
from . import store

TEXT_EXT = (".txt", ".text", ".md")
JSONL_EXT = (".jsonl", ".json", ".ndjson")
PARQUET_EXT = (".parquet",)
ARROW_EXT = (".arrow",)
KNOWN_EXT = TEXT_EXT + JSONL_EXT + PARQUET_EXT + ARROW_EXT


@dataclasses.dataclass(frozen=True)
class TokenizeOptions:
    """How records become tokens. `template_kwargs`: variables for the chat template (e.g.
    {"enable_thinking": True})."""

    text_field: str = "text"
    messages_field: str = "messages"
    eos: bool = True
    loss_mask: bool = False
    on_bad_record: str = "skip"
    template_kwargs: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.on_bad_record not in ("skip", "error"):
            raise ValueError(f"on_bad_record={self.on_bad_record!r}: must be 'skip' or 'error'")


# --------------------------------------------------------------------------- inputs
def _hf_arrow_files(folder: str, split: str | None) -> list[str] | None:
    """The arrow files of a `datasets.save_to_disk` folder (a Dataset, or a DatasetDict's `split`);
    None if `folder` is not one."""
    if os.path.isfile(os.path.join(folder, "dataset_dict.json")):
        with open(os.path.join(folder, "dataset_dict.json")) as f:
            splits = json.load(f).get("splits", [])
        pick = split or ("train" if "train" in splits else None)
        if pick is None or pick not in splits:
            raise ValueError(f"{folder}: a DatasetDict with splits {splits}; choose one with --split")
        return _hf_arrow_files(os.path.join(folder, pick), None)
    state = os.path.join(folder, "state.json")
    if not os.path.isfile(state):
        return None
    with open(state) as f:
        files = [d["filename"] for d in json.load(f).get("_data_files", [])]
    if not files:
        raise ValueError(f"{folder}: state.json lists no arrow files")
    return [os.path.join(folder, n) for n in files]


def discover(inputs, split: str | None = None) -> list[str]:
    """The input files, in a fixed order: files as given, `datasets` folders as their arrow files,
    other folders as their files with a known extension (sorted, recursively)."""
    units = []
    for item in inputs:
        item = os.fspath(item)
        if os.path.isfile(item):
            if not item.endswith(KNOWN_EXT):
                raise ValueError(f"{item}: unknown input type (known: {', '.join(KNOWN_EXT)}, or a `datasets` "
                                 "save_to_disk folder)")
            units.append(os.path.abspath(item))
        elif os.path.isdir(item):
            arrow = _hf_arrow_files(item, split)
            if arrow is not None:
                units += [os.path.abspath(p) for p in arrow]
                continue
            found = sorted(os.path.join(d, n) for d, _, names in os.walk(item) for n in names
                           if n.endswith(KNOWN_EXT))
            if not found:
                raise ValueError(f"{item}: no input files ({', '.join(KNOWN_EXT)}) in this folder")
            units += [os.path.abspath(p) for p in found]
        else:
            raise ValueError(f"{item}: no such file or folder")
    if len(set(units)) != len(units):
        raise ValueError("an input file is named twice")
    return units


def _rows_of_table(batches, path):
    row = 0
    for batch in batches:
        for rec in batch.to_pylist():
            row += 1
            yield f"{path}: row {row}", rec


def records(path: str):
    """(where, record) for every record of one input file; a record is a dict (or a str for text
    files), `where` names file and line / row; malformed JSON gives the exception as the record."""
    if path.endswith(TEXT_EXT):
        with open(path, encoding="utf-8") as f:
            yield path, {"text": f.read()}
    elif path.endswith(JSONL_EXT):
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if raw.strip():
                    try:
                        yield f"{path}:{lineno}", json.loads(raw.decode("utf-8"))
                    except (UnicodeDecodeError, json.JSONDecodeError) as e:
                        yield f"{path}:{lineno}", e
    elif path.endswith(PARQUET_EXT):
        import pyarrow.parquet as pq
        yield from _rows_of_table(pq.ParquetFile(path).iter_batches(batch_size=1024), path)
    else:
        import pyarrow as pa
        with pa.memory_map(path) as src:
            try:
                reader = pa.ipc.open_stream(src)
            except pa.ArrowInvalid:
                src.seek(0)
                reader = pa.ipc.open_file(src)
                yield from _rows_of_table((reader.get_batch(i) for i in range(reader.num_record_batches)), path)
                return
            yield from _rows_of_table(reader, path)


# --------------------------------------------------------------------------- one record
class BadRecord(ValueError):
    pass


def _assistant_spans(chat, messages, full: str, kwargs) -> list[tuple[int, int]]:
    """Character spans of `full` written for assistant turns: for assistant message k, the text
    between the rendered prefix (messages[:k] + generation prompt) and the render of messages[:k+1],
    where both are prefixes of the full render (templates that rewrite earlier turns, e.g. by
    dropping their reasoning, only give the turns they leave intact)."""
    spans = []
    for k, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        start = chat.render(messages[:k], add_generation_prompt=True, **kwargs)
        end = full if k == len(messages) - 1 else chat.render(messages[:k + 1], add_generation_prompt=False, **kwargs)
        if full.startswith(start) and full.startswith(end) and len(end) > len(start):
            spans.append((len(start), len(end)))
    return spans


def encode_record(chat, rec, opts: TokenizeOptions, eos_id: int | None):
    """(token ids int64, loss mask int8 or None) of one record; BadRecord says why not."""
    if isinstance(rec, Exception):
        raise BadRecord(f"malformed JSON ({rec.__class__.__name__}: {rec})")
    if not isinstance(rec, dict):
        raise BadRecord(f"a record must be an object, got {type(rec).__name__}")
    messages = rec.get(opts.messages_field)
    if messages is not None:
        if (not isinstance(messages, list) or not messages
                or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages)):
            raise BadRecord(f"{opts.messages_field!r} must be a non-empty list of {{'role', 'content'}} objects")
        if chat.chat_template is None:
            raise ValueError("the tokenizer folder has no chat template, so `messages` records cannot be rendered")
        full = chat.render(messages, add_generation_prompt=False, **opts.template_kwargs)
        enc = chat.tokenizer.encode(full, add_special_tokens=False)
        ids = np.asarray(enc.ids, np.int64)
        mask = None
        if opts.loss_mask:
            spans = _assistant_spans(chat, messages, full, opts.template_kwargs)
            if not spans:
                raise BadRecord("no assistant turn to train on (the loss mask would be all zero)")
            starts = np.asarray([s for s, _ in enc.offsets], np.int64)
            mask = np.zeros(ids.shape, np.int8)
            for a, b in spans:
                mask[(starts >= a) & (starts < b)] = 1
        return ids, mask
    text = rec.get(opts.text_field)
    if not isinstance(text, str) or not text:
        raise BadRecord(f"no {opts.messages_field!r} list and no non-empty string {opts.text_field!r}")
    ids = list(chat.tokenizer.encode(text, add_special_tokens=True).ids)
    if opts.eos and eos_id is not None and (not ids or ids[-1] != eos_id):
        ids.append(eos_id)
    ids = np.asarray(ids, np.int64)
    return ids, (np.ones(ids.shape, np.int8) if opts.loss_mask else None)


# --------------------------------------------------------------------------- one part
def tokenizer_identity(tokenizer_dir: str) -> dict:
    """What a shard folder records of the tokenizer (and training checks): sha256 of tokenizer.json
    and of the chat template, vocabulary size, eos / bos ids."""
    tok = ChatTokenizer.load(tokenizer_dir)
    eos = tok.token_id(tok.special.get("eos_token"))
    bos = tok.token_id(tok.special.get("bos_token"))
    return {"sha256": store.sha256_file(os.path.join(os.fspath(tokenizer_dir), "tokenizer.json")),
            "chat_template_sha256": store.sha256_text(tok.chat_template), "vocab_size": tok.vocab_size,
            "eos_id": eos, "bos_id": bos}


_WORKER = {}


def _init_worker(tokenizer_dir: str):
    chat = ChatTokenizer.load(tokenizer_dir)
    _WORKER.update(chat=chat, eos_id=chat.token_id(chat.special.get("eos_token")))


def part_name(i: int) -> str:
    return f"parts/{i:05d}"


def tokenize_part(i: int, path: str, out: str, opts: TokenizeOptions) -> dict:
    """Tokenize input file `path` into part `i` of `out`; returns (and writes as done.json) its
    counts. Runs in a worker (`_init_worker` loaded the tokenizer)."""
    chat, eos_id = _WORKER["chat"], _WORKER["eos_id"]
    root = store.join(out, part_name(i))
    tokens = store.Appender(store.join(root, "tokens"), "uint32", inner=store.TOKENS_INNER, outer=store.TOKENS_OUTER)
    mask = (store.Appender(store.join(root, "loss_mask"), "uint8", inner=store.TOKENS_INNER,
                           outer=store.TOKENS_OUTER) if opts.loss_mask else None)
    lengths = store.Appender(store.join(root, "lengths"), "int32", inner=store.INDEX_INNER, outer=store.INDEX_OUTER)
    docs = ntok = bad = chats = masked = 0
    top, bad_examples = -1, []
    for where, rec in records(path):
        try:
            ids, m = encode_record(chat, rec, opts, eos_id)
        except BadRecord as e:
            if opts.on_bad_record == "error":
                raise ValueError(f"{where}: {e} (--on-bad-record error; 'skip' skips and counts)") from None
            bad += 1
            if len(bad_examples) < 5:
                bad_examples.append(f"{where}: {e}")
            continue
        if ids.size == 0:
            continue
        tokens.append(ids)
        if mask is not None:
            mask.append(m)
            masked += int(m.sum())
        lengths.append([ids.size])
        docs, ntok, top = docs + 1, ntok + int(ids.size), max(top, int(ids.max()))
        chats += isinstance(rec, dict) and rec.get(opts.messages_field) is not None
    tokens.close()
    if mask is not None:
        mask.close()
    lengths.close()
    done = {"input": path, "input_bytes": os.path.getsize(path), "documents": docs, "tokens": ntok,
            "chat_documents": chats, "loss_tokens": masked if opts.loss_mask else ntok, "max_token_id": top,
            "bad_records": bad, "bad_examples": bad_examples}
    store.write_json(root, "done.json", done)
    return done


def _run_part(args):
    return tokenize_part(*args)


# --------------------------------------------------------------------------- the whole run
def length_histogram(lengths: np.ndarray) -> dict:
    """Documents per power-of-two length bucket: {"1-1": n, "2-3": n, "4-7": n, ...}."""
    if lengths.size == 0:
        return {}
    b = np.floor(np.log2(lengths)).astype(np.int64)
    counts = np.bincount(b)
    return {f"{1 << k}-{(2 << k) - 1}": int(c) for k, c in enumerate(counts) if c}


def finalize(out: str, units: list[str], parts: list[dict], plan: dict) -> dict:
    """Write the document index, the length order and the manifest (last) from the finished parts."""
    lens = [store.open_array(store.join(out, part_name(i), "lengths")).read().result().astype(np.int64)
            for i in range(len(units))]
    n = int(sum(x.size for x in lens))
    if n == 0:
        raise ValueError(f"no usable documents in {len(units)} input file(s) "
                         f"({sum(p['bad_records'] for p in parts)} bad records skipped)")
    lengths = np.concatenate(lens)
    index = np.empty((n, 3), np.int64)
    index[:, 0] = np.concatenate([np.full(x.size, i, np.int64) for i, x in enumerate(lens)])
    index[:, 1] = np.concatenate([np.cumsum(x) - x for x in lens])
    index[:, 2] = lengths
    order = np.argsort(-lengths, kind="stable")
    by_length = np.stack([order, lengths[order], np.cumsum(lengths[order])], axis=1)
    for name, rows in (("index", index), ("by_length", by_length)):
        app = store.Appender(store.join(out, name), "int64", inner=store.INDEX_INNER, outer=store.INDEX_OUTER, cols=3)
        app.append(rows)
        app.close()
    manifest = {
        "format": store.FORMAT, "tokenizer": plan["tokenizer"], "options": plan["options"],
        "documents": n, "tokens": int(lengths.sum()), "max_token_id": max(p["max_token_id"] for p in parts),
        "chat_documents": int(sum(p["chat_documents"] for p in parts)),
        "loss_tokens": int(sum(p["loss_tokens"] for p in parts)), "loss_mask": bool(plan["options"]["loss_mask"]),
        "min_length": int(lengths.min()), "max_length": int(lengths.max()),
        "mean_length": float(lengths.mean()), "length_histogram": length_histogram(lengths),
        "bad_records": int(sum(p["bad_records"] for p in parts)),
        "bad_examples": [e for p in parts for e in p["bad_examples"]][:10],
        "parts": [part_name(i) for i in range(len(units))],
        "inputs": [{"path": p["input"], "documents": p["documents"], "tokens": p["tokens"],
                    "bad_records": p["bad_records"]} for p in parts],
    }
    store.write_json(out, "manifest.json", manifest)
    return manifest


def write_documents(out: str, documents, tokenizer: dict, loss_masks=None) -> dict:
    """Already-tokenized `documents` (int sequences; an iterable, consumed once) -> a one-part shard
    folder with the same layout and manifest as `tokenize` (`tokenizer`: `tokenizer_identity`
    of the tokenizer that made them). For corpora tokenized elsewhere, benchmarks and tests."""
    if store.exists(out, "plan.json") or store.exists(out, "manifest.json"):
        raise ValueError(f"{out} already holds token shards; choose another folder (nothing was changed)")
    opts = {"source": "write_documents", "loss_mask": loss_masks is not None}
    plan = {"format": store.FORMAT, "inputs": ["<documents>"], "tokenizer": tokenizer, "options": opts}
    store.write_json(out, "plan.json", plan)
    root = store.join(out, part_name(0))
    tokens = store.Appender(store.join(root, "tokens"), "uint32", inner=store.TOKENS_INNER, outer=store.TOKENS_OUTER)
    mask = (store.Appender(store.join(root, "loss_mask"), "uint8", inner=store.TOKENS_INNER,
                           outer=store.TOKENS_OUTER) if loss_masks is not None else None)
    lengths = store.Appender(store.join(root, "lengths"), "int32", inner=store.INDEX_INNER, outer=store.INDEX_OUTER)
    docs = ntok = masked = 0
    top = -1
    masks = iter(loss_masks) if loss_masks is not None else None
    for i, d in enumerate(documents):
        d = np.asarray(d)
        if d.ndim != 1 or d.size == 0 or not np.issubdtype(d.dtype, np.integer) or d.min() < 0:
            raise ValueError(f"documents[{i}]: must be a non-empty 1-D sequence of non-negative token ids")
        tokens.append(d)
        if mask is not None:
            m = np.asarray(next(masks))
            if m.shape != d.shape:
                raise ValueError(f"loss_masks[{i}]: shape {m.shape} != its document's {d.shape}")
            mask.append(m)
            masked += int(m.sum())
        lengths.append([d.size])
        docs, ntok, top = docs + 1, ntok + int(d.size), max(top, int(d.max()))
    tokens.close()
    if mask is not None:
        mask.close()
    lengths.close()
    done = {"input": "<documents>", "documents": docs, "tokens": ntok, "chat_documents": 0,
            "loss_tokens": masked if mask is not None else ntok, "max_token_id": top, "bad_records": 0,
            "bad_examples": []}
    store.write_json(root, "done.json", done)
    return finalize(out, ["<documents>"], [done], plan)


def tokenize(inputs, tokenizer_dir: str, out: str, opts: TokenizeOptions = TokenizeOptions(), *,
             workers: int = 1, split: str | None = None, progress: bool = True) -> dict:
    """Tokenize `inputs` with the tokenizer of `tokenizer_dir` into the shard folder `out`;
    resumes a killed run of the same inputs and options; returns the manifest."""
    units = discover(inputs, split)
    if not os.path.isfile(os.path.join(os.fspath(tokenizer_dir), "tokenizer.json")):
        raise ValueError(f"--tokenizer {tokenizer_dir}: no tokenizer.json (give the parent's HF folder)")
    ident = tokenizer_identity(tokenizer_dir)
    plan = {"format": store.FORMAT, "inputs": units, "tokenizer": ident,
            "options": dataclasses.asdict(opts)}
    old = store.read_json(out, "plan.json")
    if old is not None and old != json.loads(json.dumps(plan)):
        changed = [k for k in plan if old.get(k) != json.loads(json.dumps(plan[k]))]
        raise ValueError(f"{out} holds a tokenization of other inputs / tokenizer / options ({', '.join(changed)} "
                         "differ); choose another --out (nothing was changed)")
    if old is None:
        store.write_json(out, "plan.json", plan)
    else:
        manifest = store.read_json(out, "manifest.json")
        if manifest is not None:
            return manifest
    parts: dict[int, dict] = {}
    for i in range(len(units)):
        done = store.read_json(store.join(out, part_name(i)), "done.json")
        if done is not None:
            parts[i] = done
    todo = [(i, units[i], out, opts) for i in range(len(units)) if i not in parts]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(units), initial=len(parts), unit="file", desc="tokenize", dynamic_ncols=True)
        bar.set_postfix(tokens=f"{sum(p['tokens'] for p in parts.values()):,}")

    def finished(i, res):
        parts[i] = res
        if bar is not None:
            bar.update(1)
            bar.set_postfix(tokens=f"{sum(p['tokens'] for p in parts.values()):,}")

    try:
        if workers <= 1 or len(todo) <= 1:
            _init_worker(tokenizer_dir)
            for args in todo:
                finished(args[0], _run_part(args))
        else:
            import concurrent.futures as cf
            import multiprocessing as mp
            with cf.ProcessPoolExecutor(min(workers, len(todo)), mp_context=mp.get_context("spawn"),
                                        initializer=_init_worker, initargs=(tokenizer_dir,)) as pool:
                futs = {pool.submit(_run_part, args): args[0] for args in todo}
                for f in cf.as_completed(futs):
                    finished(futs[f], f.result())
    finally:
        if bar is not None:
            bar.close()
    return finalize(out, units, [parts[i] for i in range(len(units))], plan)


# --------------------------------------------------------------------------- CLI
def _cli(args) -> int:
    try:
        kwargs = json.loads(args.template_kwargs) if args.template_kwargs else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"--template-kwargs: not JSON ({e})") from None
    if not isinstance(kwargs, dict):
        raise ValueError("--template-kwargs: must be a JSON object")
    opts = TokenizeOptions(text_field=args.text_field, messages_field=args.messages_field, eos=not args.no_eos,
                           loss_mask=args.loss_mask, on_bad_record=args.on_bad_record, template_kwargs=kwargs)
    m = tokenize(args.inputs, args.tokenizer, args.out, opts, workers=args.workers, split=args.split,
                 progress=not args.quiet)
    print(f"{args.out}: {m['documents']:,} documents, {m['tokens']:,} tokens ({m['chat_documents']:,} chats), "
          f"lengths {m['min_length']}-{m['max_length']} (mean {m['mean_length']:.0f}), "
          f"{m['bad_records']} bad records skipped", file=sys.stderr)
    for e in m["bad_examples"][:3]:
        print(f"  skipped: {e}", file=sys.stderr)
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("tokenize", help="text / jsonl / parquet / datasets folders -> token shards for training",
                       description=__doc__.split("\n\n")[1])
    p.add_argument("inputs", nargs="+", help="files (.txt .jsonl .parquet .arrow) or folders (a datasets "
                                             "save_to_disk folder, or a folder of such files)")
    p.add_argument("--tokenizer", required=True, help="the parent's HF folder (tokenizer.json, chat template)")
    p.add_argument("--out", required=True, help="the shard folder (local or gs://bucket/path)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="processes, one input file each (default: CPUs - 1)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--messages-field", default="messages")
    p.add_argument("--no-eos", action="store_true", help="do not append EOS to plain-text documents")
    p.add_argument("--loss-mask", action="store_true", help="store a mask that is 0 on chat prompt tokens")
    p.add_argument("--template-kwargs", default=None, help='chat template variables, JSON (e.g. \'{"enable_thinking": true}\')')
    p.add_argument("--on-bad-record", choices=("skip", "error"), default="skip")
    p.add_argument("--split", default=None, help="the split of a DatasetDict folder (default: train)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cli)
