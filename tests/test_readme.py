"""Every Python snippet in README.md runs as written: in order, as one session (the README says
its snippets continue one another), in a fresh process on 8 CPU devices (the sharding snippet
builds an fsdp=4 x tensor=2 mesh), from a scratch folder. Only what cannot run here is replaced,
outside the snippets: the Hub download returns a tiny local checkpoint of the named model's
layout, and the main job's output folder holds a tiny nested checkpoint with the task's tokenizer."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT

README = os.path.join(REPO_ROOT, "README.md")


def python_snippets(text: str) -> list[tuple[int, str]]:
    """(line number, code) of every ```python block."""
    return [(text[:m.start()].count("\n") + 2, m.group(1)) for m in re.finditer(r"```python\n(.*?)```", text, re.S)]


def test_snippet_extraction_sees_every_python_block():
    text = open(README).read()
    found = python_snippets(text)
    assert len(found) == text.count("```python") >= 5
    for line, code in found:
        compile(code, f"README.md:{line}", "exec")   # each is valid Python on its own


def _tiny_hub_checkpoint(directory: str) -> None:
    """A tiny stand-in for the published dense hybrid (Nemotron Nano 12B v2's layer kinds, 8 Mamba
    groups), with a tokenizer transformers' AutoTokenizer reads."""
    import elastic_jax as ej
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    cfg = ej.NemotronHConfig(vocab_size=512, hidden_size=64, hybrid_override_pattern="M-M*-M-", num_attention_heads=4,
                             num_key_value_heads=2, head_dim=16, intermediate_size=128, mamba_num_heads=32,
                             mamba_head_dim=16, n_groups=8, ssm_state_size=8, chunk_size=8)
    rng = np.random.RandomState(0)
    params = ej.init_params(cfg, __import__("jax").random.PRNGKey(0))
    params = __import__("jax").tree.map(lambda p: p + 0.02 * rng.randn(*p.shape).astype(p.dtype), params)
    ej.save_hf(directory, cfg, params)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 500)},
             **{w: 500 + i for i, w in enumerate(["The", "capital", "of", "France", "is"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<unk>").save_pretrained(directory)


def _tiny_main_job_output(directory: str) -> None:
    """What `elastic-jax run experiments/tiny_star_elastic.py --out runs/tiny` leaves in
    checkpoints/nested, at random weights: the model, the budget table, the task's tokenizer."""
    import jax
    import elastic_jax as ej
    from elastic_jax.infer.checkpoint import save_nested
    from elastic_jax.tasks.tokenizer import TaskTokenizer
    tok = TaskTokenizer.default((13, 14, 15, 16))   # the main job's combine levels
    cfg = ej.NemotronHConfig(vocab_size=tok.vocab_size, hidden_size=32, hybrid_override_pattern="M*E",
                             num_attention_heads=4, num_key_value_heads=2, head_dim=8, mamba_num_heads=4,
                             mamba_head_dim=8, n_groups=2, ssm_state_size=8, chunk_size=8, n_routed_experts=4,
                             num_experts_per_tok=2, moe_intermediate_size=16, moe_shared_expert_intermediate_size=16,
                             max_position_embeddings=256)
    params = ej.init_params(cfg, jax.random.PRNGKey(1))
    budgets = {"100%": ej.Widths(), "50%": ej.Widths(hidden=16, mamba_heads=2, attn_heads=2, moe_experts=2,
                                                       moe_ffn=8)}
    save_nested(directory, cfg, params, budgets, fractions={"100%": 1.0, "50%": 0.5}, tokenizer=tok)


_PRELUDE = r"""
import huggingface_hub, os, sys
HUB = sys.argv[1]
huggingface_hub.snapshot_download = lambda repo_id, *a, **k: HUB   # no network: the tiny stand-in
"""


@pytest.mark.slow
@pytest.mark.hf
def test_readme_python_snippets_run_as_written(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("torch")
    hub = str(tmp_path / "hub")
    _tiny_hub_checkpoint(hub)
    work = tmp_path / "work"
    _tiny_main_job_output(str(work / "runs" / "tiny" / "checkpoints" / "nested"))
    snippets = python_snippets(open(README).read())
    script = _PRELUDE + "\n".join(
        f"print('README.md:{line}', flush=True)\n"
        f"exec(compile({code!r}, 'README.md:{line}', 'exec'))" for line, code in snippets)
    # 8 CPU devices are 8 threads: on a loaded 2-core machine one may reach a collective after
    # XLA's default 40 s rendezvous limit, which aborts the process; wait longer instead
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
               " --xla_cpu_collective_call_terminate_timeout_seconds=600")
    r = subprocess.run([sys.executable, "-c", script, hub], cwd=str(work), env=env, capture_output=True, text=True,
                       timeout=900)
    ran = re.findall(r"^README.md:\d+$", r.stdout, re.M)
    assert r.returncode == 0, f"after {ran[-1:] or 'no snippet'}:\n{r.stderr[-4000:]}"
    assert len(ran) == len(snippets)
    assert os.path.isfile(work / "out" / "nano-sliced" / "config.json")
    assert json.load(open(work / "out" / "nano-sliced" / "config.json"))["hidden_size"] == 48
