"""The HF NemotronH key table: which HF tensor name fills which params leaves (METHOD §10 exports).

`RULES` is one declarative table: each `Rule` names an HF key pattern, the params leaves it fills
and the pair of transforms between the two layouts (HF `[out, in]` matrices, fused `in_proj` /
`conv1d`; ours `[in, out]` with the fused tensors split). The layer rules are declared by their
layer kind (`elastic_jax/model/kinds/`); this module adds the backbone-level ones. Keys carry a
`backbone.` prefix (Hub, `save_pretrained`) or a `model.` prefix (transformers' module tree);
`lm_head.weight` has none. Loading, validation, saving and the ModelOpt layout all walk this table.
"""
from __future__ import annotations

import re

from ..model.kinds import KINDS, layer_dims, on_register
from ..model.kinds.hf_rules import Dims, Rule, _t, _t_inv

PREFIXES = ("backbone.", "model.")

# The backbone-level rules; each layer kind declares its own (elastic_jax/model/kinds/).
_BACKBONE_RULES: tuple[Rule, ...] = (
    Rule("embeddings.weight", "top", ("embed",), lambda d: (d.V, d.D)),
    Rule("norm_f.weight", "top", ("norm_f",), lambda d: (d.D,)),
    Rule("lm_head.weight", "head", ("lm_head",), lambda d: (d.V, d.D), _t, _t_inv),
    Rule("norm.weight", "layer", ("norm",), lambda d: (d.D,)),
)
RULES: tuple[Rule, ...] = _BACKBONE_RULES
_REGEXES: tuple = ()


def _collect_rules() -> None:
    """RULES = the backbone rules + every registered kind's `HF_RULES` (rebuilt when a kind registers,
    so read it as `keys.RULES`, not a copy imported by name)."""
    global RULES, _REGEXES
    RULES = _BACKBONE_RULES + tuple(r for kind in KINDS.values() for r in kind.HF_RULES)
    _REGEXES = tuple(r.regex for r in RULES)


on_register(_collect_rules)


def split_prefix(key: str) -> tuple[str, str]:
    """(prefix, the key without it): `backbone.` / `model.` / "" (lm_head, mtp.*)."""
    prefix = next((p for p in PREFIXES if key.startswith(p)), "")
    return prefix, key[len(prefix):]


def match(rel: str) -> tuple[int, re.Match] | None:
    """(index into RULES, the match) of a key without its prefix, or None (no NemotronH tensor)."""
    for n, rx in enumerate(_REGEXES):
        m = rx.match(rel)
        if m is not None:
            return n, m
    return None


def module_of(weight_key: str) -> str:
    """The HF module of a weight key (`...q_proj.weight` -> `...q_proj`)."""
    return weight_key[:-len(".weight")]


__all__ = ["Dims", "PREFIXES", "RULES", "Rule", "layer_dims", "match", "module_of", "split_prefix"]
