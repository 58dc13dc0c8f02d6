"""The nested checkpoint: ONE parameter set from which every trained budget is sliced zero-shot,
stored as an HF NemotronH folder (`elastic_jax.hf.save_hf`) that standard tools open:

  config.json, model.safetensors (or shards + index), generation_config.json   the HF checkpoint
  elastic_budgets.json        the budget table: {"budgets": [{"name", "fraction", "widths",
                              "params", "active_params"}], "elastic": ElasticConfig dict}
  elastic/router.safetensors  the budget router (optional; a few KiB), in a subfolder so that vLLM /
                              SGLang, which load every top-level *.safetensors, see only the model
  tokenizer.json, tokenizer_config.json   the task tokenizer (optional) with its chat template

`elastic-jax eval` / `generate` read it; so does `transformers` (the parent model). A folder in the
previous bespoke layout (`budgets.json` + flattened `model.safetensors`) is refused by
`LegacyNestedCheckpoint`, which says how to re-export it.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np

from ..config import NemotronHConfig
from ..errors import HFCheckpointError, JSONFileError, json_field, read_json
from ..hf import BUDGETS_FILE, flatten_tree, load_hf, read_budget_table, save_hf, unflatten_tree
from ..model.params import check_params
from ..widths import WIDTH_AXES, Widths

AXES = tuple(WIDTH_AXES) + ("layers",)
flatten, unflatten = flatten_tree, unflatten_tree


class LegacyNestedCheckpoint(HFCheckpointError):
    """A nested checkpoint written in the layout used before the HF one."""


def widths_to_dict(w: Widths) -> dict:
    return {a: (None if getattr(w, a) is None else np.asarray(getattr(w, a)).tolist()) for a in AXES}


def save_nested(directory: str, cfg: NemotronHConfig, params, budgets: dict[str, Widths], *,
                fractions: dict[str, float] | None = None, router_params=None, elastic_cfg=None,
                tokenizer=None) -> dict[str, int]:
    """Write the nested checkpoint: `save_hf` with the budget table (and `fractions`, `elastic_cfg`),
    the router and the tokenizer, atomically; an existing folder is replaced only if it holds
    nothing but what save_hf writes. Returns {relative file path: bytes}."""
    with tempfile.TemporaryDirectory() as tok_dir:
        if tokenizer is not None:
            tokenizer.save(os.path.join(tok_dir, "tokenizer.json"))
            if hasattr(tokenizer, "save_config"):     # the chat template, for `elastic-jax generate`
                tokenizer.save_config(tok_dir)
        save_hf(directory, cfg, params, overwrite=True, budgets=budgets,
                fractions={n: (None if fractions is None else fractions.get(n)) for n in budgets},
                elastic_cfg=elastic_cfg, router_params=router_params,
                tokenizer_dir=tok_dir if tokenizer is not None else None)
    return folder_files(directory)


def folder_files(directory: str) -> dict[str, int]:
    """{path relative to `directory`: bytes} of every file under it."""
    out = {}
    for root, _, files in os.walk(directory):
        for f in files:
            path = os.path.join(root, f)
            out[os.path.relpath(path, directory)] = os.path.getsize(path)
    return dict(sorted(out.items()))


def save_standalone(directory: str, cfg: NemotronHConfig, params) -> int:
    """One standalone (sliced or independent) model as an HF folder. Returns bytes."""
    save_hf(directory, cfg, params, overwrite=True)
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))


def check_not_legacy(directory: str) -> None:
    """Raise `LegacyNestedCheckpoint` for a folder in the pre-HF nested layout."""
    if os.path.isfile(os.path.join(directory, "budgets.json")) and not os.path.isfile(
            os.path.join(directory, BUDGETS_FILE)):
        raise LegacyNestedCheckpoint(
            f"{directory} is a nested checkpoint in the previous layout (budgets.json + a flattened "
            "model.safetensors), which this version no longer reads",
            ["re-export it from its elastic training run: `elastic-jax export <main job out>/elastic <new folder>` "
             "writes the HF folder with its budget table; or rerun the main job (it rewrites checkpoints/nested)"])


def load_nested(directory: str):
    """-> (cfg, params, budgets {name: Widths}, fractions {name: float|None}) of a nested
    checkpoint (an HF folder with `elastic_budgets.json`); errors name the file and field."""
    directory = os.fspath(directory)
    check_not_legacy(directory)
    for f in ("config.json", BUDGETS_FILE):
        if not os.path.isfile(os.path.join(directory, f)):
            raise FileNotFoundError(f"{directory} is not a nested checkpoint: missing {f}")
    cfg, params = load_hf(directory)
    table = read_budget_table(directory, cfg)
    path = os.path.join(directory, BUDGETS_FILE)
    exact = read_json(path, what="nested budget table").get("config")
    if exact is not None:    # the parent's own config (config.json is its HF spelling)
        try:
            exact = NemotronHConfig.from_dict(json_field({"config": exact}, "config", dict, path))
            check_params(params, exact)
        except (ValueError, TypeError) as e:
            raise JSONFileError(f"{path}: field 'config': {e}") from None
        cfg = exact
    return cfg, params, {n: e["widths"] for n, e in table.items()}, {n: e["fraction"] for n, e in table.items()}


