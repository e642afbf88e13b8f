"""The ONNX graph as a differentiable torch module (the engine; no calibration policy here).

module.py: OnnxModule (planner and executor); ops/: ONNX op implementations; fakequant.py: the torch mirror of
qmath.py with straight-through gradients."""
from .fakequant import dequantize, fake_quant, quantize, round_ste
from .module import OnnxModule

__all__ = ["OnnxModule", "fake_quant", "quantize", "dequantize", "round_ste"]
