"""QuantizeLinear / DequantizeLinear (opset 10..21 semantics: per-tensor, per-axis, blocked; 8-, 16- and
4-bit integers) with straight-through gradients (see torchexec/fakequant.py for the estimator)."""
from __future__ import annotations

import onnx

from ..fakequant import ONNX_QRANGE, broadcast_qparam, dequantize, quantize
from . import NodeCtx, register

_T = onnx.TensorProto


def _type_name(t: int) -> str:
    return _T.DataType.Name(t) if t in _T.DataType.values() else str(t)


@register("QuantizeLinear")
def _quantize_linear(node: NodeCtx):
    axis, block = node.attr("axis", 1), node.attr("block_size", 0)
    zp_type = node.input_types[2] if len(node.input_types) > 2 and node.num_inputs > 2 else 0
    out_type = zp_type or node.attr("output_dtype", 0) or (node.output_types[0] if node.output_types else 0)
    if not out_type and node.num_inputs > 2 and node.node.input[2]:
        raise node.unsupported("a zero point of unknown type (give it as an initializer or Constant)")
    out_type = out_type or _T.UINT8
    if out_type not in ONNX_QRANGE or out_type == _T.INT32:
        raise node.unsupported(f"quantization to {_type_name(out_type)}")
    qmin, qmax = ONNX_QRANGE[out_type]

    def quantize_linear(x, scale, zero_point=None):
        s = broadcast_qparam(scale, x.shape, axis, block)
        if x.dtype != s.dtype:
            x = x.to(s.dtype)
        z = 0
        if zero_point is not None:
            z = broadcast_qparam(zero_point, x.shape, axis, block).to(s.dtype)
        return quantize(x, s, z, qmin, qmax)
    return quantize_linear


@register("DequantizeLinear")
def _dequantize_linear(node: NodeCtx):
    axis, block = node.attr("axis", 1), node.attr("block_size", 0)
    in_type = node.input_types[0] if node.input_types else 0
    if in_type and in_type not in ONNX_QRANGE:
        raise node.unsupported(f"dequantization of {_type_name(in_type)}")

    def dequantize_linear(x, scale, zero_point=None):
        s = broadcast_qparam(scale, x.shape, axis, block)
        z = 0 if zero_point is None else broadcast_qparam(zero_point, x.shape, axis, block)
        return dequantize(x, s, z)
    return dequantize_linear
