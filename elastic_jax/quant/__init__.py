"""FP8 / NVFP4 nested checkpoints (METHOD §10): number formats, fixed quantization state with
calibration, and the ModelOpt Hugging Face layout (`elastic_jax.quant.export`). Slicing a state with its model:
`elastic_jax.elastic.slice_quant_state`."""
from .formats import (FORMATS, FP4_MAX, FP8_MAX, NVFP4_BLOCK, fp8_with_scale, nvfp4_activation, nvfp4_scales,
                      nvfp4_with_scales, pack_e2m1, quantize_dequantize, quantize_params, unpack_e2m1)
from .qweight import QWeight
from .state import (RECIPES, QuantizationError, QuantSpec, QuantState, apply_layer, calibrate, calibrate_kv_cache,
                    init_quant_state, quantize_weight, recipe_spec)

__all__ = ["FORMATS", "FP4_MAX", "FP8_MAX", "NVFP4_BLOCK", "QWeight", "QuantSpec", "QuantState", "QuantizationError",
           "RECIPES", "apply_layer", "calibrate", "calibrate_kv_cache", "recipe_spec", "fp8_with_scale", "init_quant_state", "nvfp4_activation", "nvfp4_scales",
           "nvfp4_with_scales", "pack_e2m1", "quantize_dequantize", "quantize_params", "quantize_weight",
           "unpack_e2m1"]
