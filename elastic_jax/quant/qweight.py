"""`QWeight`: a fake-quantized projection weight as the mixers see it (METHOD §10).

A quantized model's params hold a `QWeight` leaf in place of each quantized projection
(`quant.qweight_params`, as jax-llm-examples' `QuantArray`): the weight already rounded with the
layer's fixed scales, plus the static input scale. `forward` takes such params like any other
(they stack for the scanned layer loop); `dense` / the grouped matmul call `unwrap`, i.e.
`quantize_input` on their left operand, which is where an FP8 / NVFP4 kernel quantizes its
activations: FP8 per tensor with the calibrated scale; NVFP4 in 16-element blocks along the
reduction (last) axis, dynamic E4M3 block scales against the calibrated FP32 second-level scale.
`observe` (calibration only) records the input's amax instead of quantizing it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax

from .formats import fp8_with_scale, nvfp4_activation


@dataclass(frozen=True)
class QWeight:
    w: Any                                   # the fake-quantized weight [in, out] / [E, in, out]
    input_scale: Any = None                  # static activation scale (None: activations unquantized)
    observe: Callable | None = None          # calibration hook: observe(x) records amax |x|
    fmt: str = "fp8"                         # the activation format ("fp8" | "nvfp4")

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
        return quantize_activation(x, self.input_scale, self.fmt)


jax.tree_util.register_dataclass(QWeight, data_fields=["w", "input_scale"], meta_fields=["observe", "fmt"])


def quantize_activation(x, input_scale, fmt: str):
    """A matmul's left operand `x` [..., in] fake-quantized with its static `input_scale` (None:
    unchanged): FP8 per tensor; NVFP4 per 16-element block along the last (reduction) axis."""
    if input_scale is None:
        return x
    return fp8_with_scale(x, input_scale) if fmt == "fp8" else nvfp4_activation(x, input_scale, axis=-1)


def unwrap(x, w):
    """(x, w) for a plain matmul: a `QWeight` quantizes x and hands back its weight."""
    if isinstance(w, QWeight):
        return w.quantize_input(x), w.w
    return x, w
