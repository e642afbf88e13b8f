"""Torch side of the compiler: the ONNX executor, fake quantization, observers and calibration."""
from .executor import OnnxModule
from .fakequant import dequantize, fake_quant, qrange, quantize, round_ste

__all__ = ["OnnxModule", "fake_quant", "quantize", "dequantize", "round_ste", "qrange"]
