"""Fault injection, inference side (issue 29): a damaged or hostile tokenizer / template /
generation-config file is one `error:` line naming the file; a chat template cannot stall
`generate`; NaN / inf weights are refused where loaded, saved and exported (the tensor named, an
explicit flag to allow them) and non-finite logits stop generation. Every case checks the exit
status, the single error line, and that the user's files are unchanged."""
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import elastic_jax as ej
from elastic_jax import cli
from elastic_jax.errors import NonFiniteError
from elastic_jax.infer import chat
from test_faults import _sums, _tiny
from test_faults_io import _one_error
from test_generate_text import _tokenizer_folder


@pytest.fixture(scope="module")
def folder_template(tmp_path_factory):
    root = tmp_path_factory.mktemp("inf")
    tok = _tokenizer_folder(str(root / "tok"))
    cfg, params = _tiny()
    return ej.save_hf(root / "hf", cfg, params, tokenizer_dir=tok)


@pytest.fixture
def folder(folder_template, tmp_path):
    d = tmp_path / "hf"
    shutil.copytree(folder_template, d)
    return d


def _generate(folder, capsys, *extra):
    rc = cli.main(["generate", str(folder), "--prompt", "hello world", "--max-tokens", "2", *extra])
    return rc, capsys.readouterr().err


# ================================================================== tokenizer files
@pytest.mark.parametrize("name,content,needle", [
    ("tokenizer.json", b"\xff\xfegarbage{", "tokenizer.json (tokenizer): not UTF-8"),
    ("tokenizer.json", b"{not json", "tokenizer.json (tokenizer): not valid JSON"),
    ("tokenizer.json", b'{"model": 3}', "tokenizer.json (tokenizer): not a valid `tokenizers` file"),
    ("tokenizer_config.json", b"[1, 2]", "tokenizer_config.json (tokenizer config): the top level must be"),
    ("tokenizer_config.json", b'{"chat_template": 7}', "field 'chat_template' must be text"),
    ("tokenizer_config.json", b'{"chat_template": [{"name": "default"}]}', "field 'chat_template' must be text or"),
    ("tokenizer_config.json", b'{"eos_token": ["</s>"]}', "field 'eos_token' must be text"),
    ("generation_config.json", b"[2]", "generation_config.json (generation config): the top level must be"),
    ("generation_config.json", b'{"eos_token_id": "two"}', "field 'eos_token_id' must be a token id"),
    ("generation_config.json", b'{"eos_token_id": [2, -1]}', "field 'eos_token_id' must be a token id"),
    ("chat_template.jinja", b"\xff\xfe{{ x }}", "chat_template.jinja (chat template): not UTF-8"),
    ("chat_template.jinja", b"{% for m in messages %}{{ m['content'] }", "chat_template.jinja: the chat template has a syntax error at line 1"),
])
def test_damaged_tokenizer_files_are_one_error_naming_the_file(folder, capsys, name, content, needle):
    (folder / name).write_bytes(content)
    before = _sums(folder)
    rc, err = _generate(folder, capsys)
    _one_error(rc, err, needle)
    assert _sums(folder) == before


def test_tokenizer_json_that_is_a_folder(folder, capsys):
    os.remove(folder / "tokenizer.json")
    (folder / "tokenizer.json").mkdir()
    rc, err = _generate(folder, capsys)
    _one_error(rc, err, "tokenizer.json")


def test_template_raise_exception_is_one_line(folder, capsys):
    (folder / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ raise_exception('Only system and assistant "
        "roles are supported here') }}{% endif %}{% endfor %}")
    rc, err = _generate(folder, capsys)
    _one_error(rc, err, "chat_template.jinja: the chat template refused these messages: Only system and assistant")


def test_template_runtime_error_is_one_line(folder, capsys):
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] / 3 }}")
    rc, err = _generate(folder, capsys)
    _one_error(rc, err, "chat_template.jinja: the chat template failed (TypeError")


def test_template_with_nested_loops_stops_at_the_step_limit(folder, capsys, monkeypatch):
    monkeypatch.setattr(chat, "RENDER_STEPS", 200_000)
    (folder / "chat_template.jinja").write_text(
        "{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}x"
        "{% endfor %}{% endfor %}{% endfor %}")
    rc, err = _generate(folder, capsys)
    _one_error(rc, err, "chat_template.jinja: rendering the chat template took more than 200,000 steps")


def test_template_time_limit(monkeypatch):
    monkeypatch.setattr(chat, "RENDER_SECONDS", 0.2)
    import time
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"t.jinja: rendering the chat template took more than .* or 0.2 s"):
        chat.render_limited("{% for a in range(100000) %}{% for b in range(100000) %}{{ a }}{% endfor %}"
                            "{% endfor %}", "t.jinja")
    assert time.monotonic() - t0 < 5


def test_template_huge_repetition_refused():
    with pytest.raises(ValueError, match=r"t.jinja: the chat template failed \(SecurityError: repetition builds"):
        chat.render_limited("{{ 'x' * 1000000000 }}", "t.jinja")


def test_template_sandbox_blocks_attribute_escapes():
    with pytest.raises(ValueError, match="t.jinja: the chat template failed"):
        chat.render_limited("{{ ''.__class__.__mro__[1].__subclasses__() }}", "t.jinja")


def test_good_template_still_renders_and_the_trace_hook_is_restored(folder):
    import sys
    before = sys.gettrace()
    tok = chat.ChatTokenizer.load(folder)
    text = tok.render([{"role": "user", "content": "hello"}])
    assert text.startswith("<s><|im_start|>user\nhello<|im_end|>") and sys.gettrace() is before


def test_non_utf8_prompts_file_is_named(folder, tmp_path, capsys):
    p = tmp_path / "prompts.jsonl"
    p.write_bytes(b'{"prompt": "caf\xe9"}\n')
    rc = cli.main(["generate", str(folder), "--prompts", str(p)])
    _one_error(rc, capsys.readouterr().err, "prompts.jsonl (prompts): not UTF-8")


# ================================================================== non-finite weights
def _poison(folder, key="backbone.embeddings.weight", value=np.nan):
    from safetensors.numpy import load_file, save_file
    t = load_file(folder / "model.safetensors")
    t[key] = t[key].copy()
    t[key].flat[3] = value
    save_file(t, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_load_hf_refuses_non_finite_weights_naming_the_tensor(folder, value):
    _poison(folder, value=value)
    with pytest.raises(NonFiniteError, match=r"the weights: non-finite values .* \['embed'\].*allow_nonfinite"):
        ej.load_hf(folder)
    with pytest.warns(UserWarning, match="allowed for debugging"):
        cfg, params = ej.load_hf(folder, allow_nonfinite=True)
    assert not np.isfinite(np.asarray(params["embed"])).all()


def test_generate_on_nan_weights_is_one_error(folder, capsys):
    _poison(folder)
    before = _sums(folder)
    rc, err = _generate(folder, capsys)
    _one_error(rc, err, "non-finite values", "['embed']")
    assert _sums(folder) == before


def test_save_hf_refuses_nan_parameters_and_writes_nothing(tmp_path):
    cfg, params = _tiny()
    params = jax.tree.map(np.copy, params)
    params["layers"][1]["mixer"]["up_proj"][0, 0] = np.nan
    with pytest.raises(NonFiniteError, match=r"save_hf .*out.*backbone.layers.1.mixer.up_proj.weight.*nothing written"):
        ej.save_hf(tmp_path / "out", cfg, params)
    assert os.listdir(tmp_path) == []
    with pytest.warns(UserWarning, match="allowed for debugging"):
        ej.save_hf(tmp_path / "out", cfg, params, allow_nonfinite=True)


def test_save_hf_refuses_a_float16_overflow(tmp_path):
    cfg, params = _tiny()
    params = jax.tree.map(np.copy, params)
    params["lm_head"][0, 0] = 1e6                   # finite in float32, inf in float16
    with pytest.raises(NonFiniteError, match=r"lm_head.weight"):
        ej.save_hf(tmp_path / "out", cfg, params, dtype="float16")
    assert os.listdir(tmp_path) == []


def test_export_cli_refuses_nan_and_allows_it_with_the_flag(folder, tmp_path, capsys):
    _poison(folder)
    before = _sums(folder)
    rc = cli.main(["export", str(folder), str(tmp_path / "out"), "--quiet"])
    _one_error(rc, capsys.readouterr().err, "non-finite values", "--allow-nonfinite")
    assert not (tmp_path / "out").exists() and _sums(folder) == before
    with pytest.warns(UserWarning):
        rc = cli.main(["export", str(folder), str(tmp_path / "out"), "--quiet", "--allow-nonfinite"])
    assert rc == 0 and (tmp_path / "out" / "model.safetensors").exists()


def test_generate_stops_on_non_finite_logits(folder):
    """Finite weights whose logits overflow (final norm and lm_head of 1e20): an error, not
    `<pad> <pad> ...`."""
    from safetensors.numpy import load_file, save_file
    t = load_file(folder / "model.safetensors")
    for k in ("lm_head.weight", "backbone.norm_f.weight"):
        t[k] = np.full_like(t[k], 1e20)
    save_file(t, folder / "model.safetensors", metadata={"format": "pt"})
    from elastic_jax.infer.text import TextGenerator
    gen = TextGenerator.load(folder)
    with pytest.raises(NonFiniteError, match=r"generate \((think|answer) phase\): the logits are not finite .* row\(s\) \[0\]"):
        gen.generate(["hello world"], max_tokens=2)


def test_check_logits_names_rows():
    from elastic_jax.finite import check_logits
    check_logits(jnp.zeros((2, 5)), "x")
    with pytest.raises(NonFiniteError, match=r"row\(s\) \[1\]"):
        check_logits(jnp.asarray([[0.0, 1.0], [jnp.nan, 0.0]]), "x")
