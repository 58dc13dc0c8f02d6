"""relu² MLP layer kind (pattern char "-")."""
from __future__ import annotations

import jax.numpy as jnp

from ...sharding import constrain
from ..layers import ElasticLayer, dense, relu2


# ------------------------------------------------------------------------------ MLP
def mlp_mixer(p, x_BLD, cfg, el: ElasticLayer | None, ctx, cache):
    h = dense(x_BLD, p["up_proj"], ctx.policy)
    if el is not None and el.premask:     # official soft form: mask before relu²
        h = relu2(h * el.ffn_mask.astype(h.dtype))
    else:
        h = relu2(h)
        if el is not None:
            h = h * el.ffn_mask.astype(h.dtype)
    h = constrain(h, ("batch", "length", "act_mlp"))
    return dense(h, p["down_proj"], ctx.policy), None
