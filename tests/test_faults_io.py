"""Fault injection, files and command lines (issue 29): `eval` / `report` never replace another
job's results and write every file atomically; malformed config files, bad CLI arguments and
sizes beyond the model's context or the host's memory are one `error:` line (exit 2) before any
work, with the user's files unchanged."""
import errno
import json
import os

import pytest

from elastic_jax import cli, fileio
from elastic_jax.errors import JSONFileError, read_json
from test_faults import _leftovers, _sums, _tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = {"title": "the main job", "nested": [{"name": "100%", "params": 100, "active_params": 80, "accuracy": 0.9},
                                            {"name": "50%", "params": 50, "active_params": 40, "accuracy": 0.7}],
        "baselines": [{"name": "50%", "params": 50, "active_params": 40, "accuracy": 0.6, "train_tokens": 1000}],
        "training": {"parent_tokens": 5000, "elastic_tokens": 1000}}


def _cli(argv, capsys):
    rc = cli.main(argv)
    return rc, capsys.readouterr().err


def _one_error(rc, err, *needles):
    assert rc == 2, err[-2000:]
    assert err.count("error:") == 1 and "Traceback" not in err, err[-2000:]
    for n in needles:
        assert n in err, (n, err[-2000:])


@pytest.fixture
def run(tmp_path):
    """A run folder as the main job leaves it: results.json + report.md, and a nested checkpoint."""
    from elastic_jax.eval.report import write_report
    from elastic_jax.infer.checkpoint import save_nested
    import elastic_jax as ej
    d = tmp_path / "RUN"
    write_report(MAIN, str(d))
    cfg, params = _tiny()
    save_nested(str(d / "checkpoints" / "nested"), cfg, params, {"100%": ej.Widths(), "50%": ej.Widths(hidden=8)})
    return d


# ================================================================== eval / report never replace another job's files
def test_eval_into_the_run_folder_is_refused_naming_a_free_path(run, capsys):
    before = _sums(run)
    rc, err = _cli(["eval", str(run), "--out", str(run), "--n", "2"], capsys)
    _one_error(rc, err, "the 'run' job's results", f"--out {run}/eval")
    assert _sums(run) == before
    (run / "eval").mkdir()
    rc, err = _cli(["eval", str(run), "--out", str(run), "--n", "2"], capsys)
    _one_error(rc, err, f"--out {run}/eval-2")


def test_write_report_refuses_another_writer_and_accepts_its_own(run, tmp_path):
    from elastic_jax.eval.report import write_report
    before = _sums(run)
    with pytest.raises(FileExistsError, match=r"holds the 'run' job's results .* --out .*RUN/eval"):
        write_report(MAIN, str(run), writer="eval")
    assert _sums(run) == before
    write_report(MAIN, str(tmp_path / "ev"), writer="eval")
    write_report(MAIN, str(tmp_path / "ev"), writer="eval")                  # its own files: replaced
    assert read_json(tmp_path / "ev" / "results.json")["writer"] == "eval"


def test_unreadable_results_file_is_not_replaced(tmp_path):
    from elastic_jax.eval.report import write_report
    (tmp_path / "results.json").write_text("{truncated")
    with pytest.raises(FileExistsError, match="an unreadable results file"):
        write_report(MAIN, str(tmp_path))
    assert (tmp_path / "results.json").read_text() == "{truncated"


def test_report_rewrites_its_own_folder_atomically(run, capsys):
    rc, err = _cli(["report", str(run)], capsys)
    assert rc == 0, err
    r = read_json(run / "results.json")
    assert r["title"] == "the main job" and r["writer"] == "run" and "analysis" in r
    assert not _leftovers(run)


def test_report_on_a_full_disk_keeps_the_previous_files(run, capsys, monkeypatch):
    """The old `report` truncated results.json on a full disk; now each file is swapped in whole."""
    before = _sums(run)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(fileio.os, "fsync", full)
    rc, err = _cli(["report", str(run)], capsys)
    _one_error(rc, err, "No space left")
    assert _sums(run) == before and not _leftovers(run)
    assert read_json(run / "results.json")["title"] == "the main job"


@pytest.mark.parametrize("drop", ["accuracy", "active_params"])
def test_report_on_results_missing_fields_names_the_file(tmp_path, capsys, drop):
    results = json.loads(json.dumps(MAIN))
    del results["nested"][1][drop]
    (tmp_path / "results.json").write_text(json.dumps(results))
    before = _sums(tmp_path)
    rc, err = _cli(["report", str(tmp_path)], capsys)
    _one_error(rc, err, "results.json: a field the report needs is missing", drop)
    assert _sums(tmp_path) == before


def test_atomic_file_leaves_nothing_on_error(tmp_path):
    (tmp_path / "a.json").write_text("old")
    with pytest.raises(RuntimeError):
        with fileio.atomic_file(tmp_path / "a.json") as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("crash")
    assert (tmp_path / "a.json").read_text() == "old" and os.listdir(tmp_path) == ["a.json"]


def test_atomic_file_names_the_file_of_a_bare_write_error(tmp_path):
    """A write that fails on a full disk raises "[Errno 28]" without a path; the error names the file
    being written, and the old one stays."""
    import errno
    (tmp_path / "a.json").write_text("old")
    with pytest.raises(OSError) as e:
        with fileio.atomic_file(tmp_path / "a.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "a.json")
    assert (tmp_path / "a.json").read_text() == "old" and os.listdir(tmp_path) == ["a.json"]


# ================================================================== config files
def _hf(tmp_path, export_dir=None):
    import elastic_jax as ej
    cfg, params = _tiny()
    return ej.save_hf(tmp_path / "hf", cfg, params)


@pytest.mark.parametrize("value", ["nvfp4", ["fp8"], 3])
def test_quantization_config_of_the_wrong_type(tmp_path, capsys, value):
    d = _hf(tmp_path)
    raw = json.loads(open(os.path.join(d, "config.json")).read())
    raw["quantization_config"] = value
    open(os.path.join(d, "config.json"), "w").write(json.dumps(raw))
    before = _sums(d)
    rc, err = _cli(["export", d, str(tmp_path / "out"), "--quiet"], capsys)
    _one_error(rc, err, "config.json", "quantization_config=", "must be an object")
    assert _sums(d) == before and not (tmp_path / "out").exists()


def test_deeply_nested_json_is_named(tmp_path, capsys):
    d = _hf(tmp_path)
    open(os.path.join(d, "config.json"), "w").write("[" * 100000 + "]" * 100000)
    rc, err = _cli(["export", d, str(tmp_path / "out"), "--quiet"], capsys)
    _one_error(rc, err, "config.json (HF config): JSON nested too deeply")
    with pytest.raises(JSONFileError, match="nested too deeply"):
        read_json(os.path.join(d, "config.json"))


# ================================================================== CLI arguments, checked before any work
POD = os.path.join(ROOT, "experiments", "nemotron_nano_v2_12b.py")


@pytest.mark.parametrize("args,needle", [
    (["--infer-context", "-1"], "argument --infer-context: must be > 0"),
    (["--infer-context", "0"], "argument --infer-context: must be > 0"),
    (["--microbatches", "0"], "argument --microbatches: must be > 0"),
    (["--infer-batch", "x"], "argument --infer-batch: expected a int"),
    (["--mesh", "foo"], "argument --mesh: 'foo': expected axis=N pairs"),
    (["--mesh", "data=2,fsdp=0"], "argument --mesh"),
    (["--mesh", "data=2,data=4"], "axis 'data' given twice"),
    (["--mesh", "depth=2"], "bad part 'depth=2'"),
    (["--hbm-gib", "nan"], "argument --hbm-gib: must be > 0"),
    (["--devices", "-3"], "argument --devices: must be > 0"),
])
def test_plan_arguments_are_refused_at_parse_time(capsys, args, needle):
    with pytest.raises(SystemExit) as e:
        cli.main(["plan", POD, *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("error:") == 1 and needle in err, err


@pytest.mark.parametrize("kw,needle", [({"microbatches": 0}, "microbatches=0"),
                                       ({"infer_context": -1}, "infer_context=-1")])
def test_plan_api_refuses_non_positive_sizes(kw, needle):
    from elastic_jax.plan import plan
    with pytest.raises(ValueError, match=needle):
        plan(None, None, **kw)


def test_training_rows_longer_than_the_context_are_refused_before_work(tmp_path, capsys):
    rc, err = _cli(["run", os.path.join(ROOT, "experiments", "distill_tiny.py"), "--quick", "--out", str(tmp_path / "o"),
                    "--set", "train.stages.0.seq_len=100000000"], capsys)
    _one_error(rc, err, "Stage('short').seq_len=100000000 exceeds the model's context max_position_embeddings=")


def test_host_batch_beyond_memory_is_refused_before_allocating(monkeypatch):
    from elastic_jax import hostmem
    monkeypatch.setattr(hostmem, "available_bytes", lambda: 1 << 20)
    with pytest.raises(ValueError, match=r"batch of 4096 x 64 tokens needs about 0.00 GiB|needs about"):
        hostmem.check_host_bytes(2 << 20, "Stage('s') batch of 4096 x 64 tokens")
    hostmem.check_host_bytes(1 << 19, "fits")
    from elastic_jax.data import DataConfig
    from elastic_jax.train import OptimConfig, Stage, TrainConfig, train_lm
    cfg, params = _tiny()
    tc = TrainConfig(stages=(Stage(seq_len=64, batch_size=4096, steps=1),), tensorboard=False, plot=False,
                     optim=OptimConfig(lr=1e-3))
    with pytest.raises(ValueError, match=r"Stage\('stage'\) batch of 4096 x 64 tokens needs about"):
        train_lm(cfg, tc, params, DataConfig(num_documents=4, synthetic_vocab=32), "/nonexistent/never/made",
                 progress=False)
    assert not os.path.exists("/nonexistent/never")


# ------------------------------------------------------------------------------- data sources
@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_a_data_path_that_is_a_folder_is_named_as_a_folder(tmp_path, kind):
    from elastic_jax.data import DataConfig, make_dataset
    folder = tmp_path / "corpus"
    folder.mkdir()
    with pytest.raises(ValueError, match=r"is a folder; kind=.* reads files .*kind='shards'"):
        make_dataset(DataConfig(kind=kind, path=str(folder), tokenizer_path=str(tmp_path / "tok.json")), 64)


def test_a_file_that_is_not_parquet_is_named(tmp_path):
    from elastic_jax.data import DataConfig
    from elastic_jax.data.pipeline import _texts_parquet, DataStats
    bad = tmp_path / "corpus.parquet"
    bad.write_text('{"text": "this is jsonl, not parquet"}\n')
    with pytest.raises(ValueError, match=r"corpus.parquet: not a readable parquet file"):
        list(_texts_parquet(DataConfig(kind="parquet", path=str(bad), tokenizer_path=str(tmp_path / "t.json")),
                            DataStats()))
