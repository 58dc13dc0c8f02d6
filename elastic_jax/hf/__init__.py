"""HF NemotronH checkpoints in and out (METHOD §10 exports), one module per job:

  keys        the key table `RULES` (HF tensor name <-> params leaves), prefixes, matching
  io          safetensors files through the `safetensors` library (float8 / packed FP4 included)
  config_json `config.json` <-> NemotronHConfig (transformers' semantics, `nemotron_h_puzzle`)
  modelopt    the ModelOpt FP8 / NVFP4 layout (quantized export, dequantizing reader)
  budgets     the nested family: `elastic_budgets.json`, the budget router, `--widths`
  load, save  `load_hf`, `save_hf`

Imports run one way: keys, io, config_json, budgets at the bottom; modelopt on keys; load / save on top.
"""
from .budgets import BUDGETS_FILE, budget_table, flatten_tree, parse_widths, read_budget_table, read_router, unflatten_tree
from .config_json import hf_config_dict, read_hf_config
from .io import SAFE_INDEX, SAFE_SINGLE, checkpoint_bytes, read_tensor
from . import keys
from .keys import layer_dims
from .load import load_hf
from .save import HF_EXPORT_FILES, save_hf

__all__ = ["BUDGETS_FILE", "HF_EXPORT_FILES", "RULES", "SAFE_INDEX", "SAFE_SINGLE", "budget_table", "checkpoint_bytes",
           "flatten_tree", "hf_config_dict", "layer_dims", "load_hf", "parse_widths", "read_budget_table",
           "read_hf_config", "read_router", "read_tensor", "save_hf", "unflatten_tree"]


def __getattr__(name):
    if name == "RULES":            # rebuilt when a layer kind registers: always the current table
        return keys.RULES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
