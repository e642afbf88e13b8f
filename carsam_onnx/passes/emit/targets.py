"""Target policy: the emission options each deployment target needs."""
from __future__ import annotations

from ...config import QuantConfig


def target_options(config: QuantConfig) -> dict:
    """emit_qdq keyword arguments for config.target.

    ort: natural containers (INT4/UINT4 for grids <= 4 bits); 8-bit layer weights UINT8 with zero point 128 under
    int8_weights "u8" (config.unsigned_weights, the default of target ort).
    trt: TensorRT has INT4 only for weight-only quantization (docs/tensorrt.md), so when activations are quantized
    every grid goes in an 8-bit container (4-bit weights as INT8 values in [-8, 7], 2-4 bit activations as INT8
    behind a Clip); with float activations (a16) INT4 weights stay INT4. Activations must also be calibrated
    symmetric (config.symmetric_activations).
    """
    if config.target != "trt":
        return {"float_activations": not config.bits.quantize_activations,
                "unsigned_weights": config.unsigned_weights}
    if not config.bits.quantize_activations:
        return {"float_activations": True}
    return {"float_activations": False, "weight_container_bits": 8, "activation_container_bits": 8}
