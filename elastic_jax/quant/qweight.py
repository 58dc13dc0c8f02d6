"""`QWeight`: a fake-quantized projection weight as the mixers see it (METHOD §10).

The decoder replaces each quantized weight of a layer by a `QWeight` holding the weight already
rounded with the layer's fixed scales, plus the FP8 static input scale; `dense` / the grouped matmul
call `quantize_input` on their left operand, which is where an FP8 kernel would quantize its
activations (per tensor, with the calibrated scale). `observe` (calibration only) records the
input's amax instead of quantizing it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax

from .formats import fp8_with_scale


@dataclass(frozen=True)
class QWeight:
    w: Any                                   # the fake-quantized weight [in, out] / [E, in, out]
    input_scale: Any = None                  # FP8 activation scale (None: activations unquantized)
    observe: Callable | None = None          # calibration hook: observe(x) records amax |x|

    @property
    def shape(self):
        return self.w.shape

    @property
    def dtype(self):
        return self.w.dtype

    def quantize_input(self, x):
        if self.observe is not None:
            self.observe(x)
            return x
        if self.input_scale is None:
            return x
        return fp8_with_scale(x, self.input_scale)


jax.tree_util.register_dataclass(QWeight, data_fields=["w", "input_scale"], meta_fields=["observe"])


def unwrap(x, w):
    """(x, w) for a plain matmul: a `QWeight` quantizes x and hands back its weight."""
    if isinstance(w, QWeight):
        return w.quantize_input(x), w.w
    return x, w
