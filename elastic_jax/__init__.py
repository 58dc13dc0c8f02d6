"""elastic_jax: Star Elastic (nested elastic submodels of hybrid Mamba2/attention/MoE LLMs) in JAX.

    import elastic_jax as ej
    cfg = ej.NemotronHConfig(hidden_size=64, hybrid_override_pattern="MEM*-E")
    params = ej.init_params(cfg, jax.random.PRNGKey(0))
    logits = ej.forward(params, tokens, cfg, ej.Widths(hidden=48, mamba_heads=4))
"""
from . import errors, kernels, model, quant   # model before quant: quant.state reads the layer kinds
from .config import NemotronHConfig
from .elastic import (ElasticConfig, Importance, estimate_importance, param_count, permute_params, slice_params,
                      sliced_config, widths_for_budget)
from .model import (Cache, Generation, check_params, count_params, decode_step, forward, generate,
                    hidden_states, init_cache, init_params, param_axes, param_shapes, prefill,
                    sample_logits)
from .hf import load_hf, save_hf
from .infer.text import generate_text
from .model.policy import ComputePolicy
from .widths import SoftWidths, Widths

from ._version import __version__

__all__ = ["errors", "kernels", "quant", "NemotronHConfig", "ComputePolicy", "Widths", "SoftWidths", "init_params", "forward", "prefill",
           "decode_step", "init_cache", "Cache", "generate", "Generation", "sample_logits",
           "hidden_states", "param_axes", "param_shapes", "check_params", "count_params",
           "slice_params", "sliced_config", "param_count", "ElasticConfig", "Importance",
           "estimate_importance", "permute_params", "load_hf", "save_hf", "widths_for_budget", "generate_text"]
