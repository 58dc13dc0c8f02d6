"""The Nemotron-H hybrid decoder as pure functions over a params pytree."""
from .decoder import Cache, decode_step, forward, hidden_states, init_cache, prefill
from .generate import Generation, generate, sample_logits
from .params import check_params, count_params, init_params, param_axes, param_shapes

__all__ = ["Cache", "decode_step", "forward", "hidden_states", "init_cache", "prefill", "Generation",
           "generate", "sample_logits", "check_params", "count_params", "init_params", "param_axes",
           "param_shapes"]
