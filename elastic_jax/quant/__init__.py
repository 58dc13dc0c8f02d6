"""FP8 / NVFP4 nested checkpoints (METHOD §10): number formats, `QWeight` (a fake-quantized
projection the forward consumes), fixed quantization state (`qweight_params` turns a state and
params into the params the model runs quantized), calibration. The ModelOpt Hugging Face layout:
`elastic_jax.hf.modelopt`; slicing a state with its model: `elastic_jax.elastic.slice_quant_state`."""
from .formats import (FORMATS, FP4_MAX, FP8_MAX, NVFP4_BLOCK, fp8_with_scale, nvfp4_activation, nvfp4_scales,
                      nvfp4_with_scales, pack_e2m1, quantize_dequantize, quantize_params, unpack_e2m1)
from .qweight import QWeight

# The number formats and `QWeight` sit below the model (model/layers.py consumes QWeight leaves);
# the state and calibration sit beside it (they read the layer kinds and run the forward), so they
# load on first use: importing `quant.qweight` from the model must not import the model back.
_LAZY = {"state": ("RECIPES", "QuantizationError", "QuantSpec", "QuantState", "init_quant_state", "quantize_weight",
                   "qweight_params", "recipe_spec"),
         "calibration": ("calibrate", "calibrate_kv_cache")}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str):
    if name in _WHERE:
        import importlib
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["FORMATS", "FP4_MAX", "FP8_MAX", "NVFP4_BLOCK", "QWeight", "QuantSpec", "QuantState", "QuantizationError",
           "RECIPES", "calibrate", "calibrate_kv_cache", "fp8_with_scale", "init_quant_state", "nvfp4_activation",
           "nvfp4_scales", "nvfp4_with_scales", "pack_e2m1", "quantize_dequantize", "quantize_params",
           "quantize_weight", "qweight_params", "recipe_spec", "unpack_e2m1"]
