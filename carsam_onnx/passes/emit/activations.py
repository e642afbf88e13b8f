"""Activation writers: [Clip ->] QuantizeLinear -> DequantizeLinear on a value."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ... import qmath
from ...errors import CarsamError, ModelError
from ...qmath import ActivationQuant
from ..naming import Namer
from .containers import FLOAT_TYPES, container_type, int_tensor


def _check_activation(value: str, aq: ActivationQuant) -> None:
    try:
        qmath.check_bits(aq.bits)
    except CarsamError as e:
        raise ModelError(f"activation {value}: {e}") from None
    if not (np.isfinite(aq.scale) and aq.scale > 0):
        raise ModelError(f"activation {value}: scale {aq.scale} must be finite and > 0")
    if not aq.qmin <= aq.zero_point <= aq.qmax:
        raise ModelError(f"activation {value}: zero point {aq.zero_point} outside the grid [{aq.qmin}, {aq.qmax}]")


def activation_qdq(value: str, elem: int, aq: ActivationQuant, namer: Namer, container_bits: int | None):
    _check_activation(value, aq)
    if elem not in FLOAT_TYPES:
        raise ModelError(f"activation {value} is {TensorProto.DataType.Name(elem)}, expected FLOAT or FLOAT16")
    ftype = FLOAT_TYPES[elem]
    ctype = container_type(aq.bits, aq.signed, container_bits)
    sname = namer.scale(value)
    tensors = [numpy_helper.from_array(np.array(aq.scale, dtype=ftype), sname)]
    # Symmetric (signed, zero point 0): no zero-point input, the type comes from output_dtype (opset 21). With an
    # INT8 zero point, onnxruntime 1.31 (EXTENDED level and up) turns the pair into UINT8 (QDQS8ToU8) and then
    # MatMulAddFusion builds an invalid QuantizeLinear for MatMul + Add on 3-D inputs: the session does not load.
    symmetric = aq.signed and aq.zero_point == 0
    zp_inputs: list[str] = []
    if not symmetric:
        zname = namer.zero_point(value)
        tensors.append(int_tensor(zname, np.array(aq.zero_point), ctype))
        zp_inputs = [zname]
    nodes = []
    q_in = value
    container_range = qmath.grid(8 if ctype in (TensorProto.INT8, TensorProto.UINT8) else 4, aq.signed)
    if (aq.qmin, aq.qmax) != container_range:
        lo, hi = qmath.clip_range(aq)
        lo_name, hi_name = namer.clip_min(value), namer.clip_max(value)
        tensors += [numpy_helper.from_array(np.array(lo, dtype=ftype), lo_name),
                    numpy_helper.from_array(np.array(hi, dtype=ftype), hi_name)]
        if ctype in (TensorProto.INT8, TensorProto.UINT8):
            q_in = namer.clipped_value(value)
            nodes.append(helper.make_node("Clip", [value, lo_name, hi_name], [q_in], name=namer.clip_node(value)))
        else:
            # Same bounds as Max -> Min: onnxruntime's ClipQuantFusion (EXTENDED level and up) throws on a Clip
            # feeding a QuantizeLinear with a 4-bit zero point (onnxruntime 1.31), so the session would not load.
            low = namer.lower_clipped_value(value)
            q_in = namer.clipped_value(value)
            nodes.append(helper.make_node("Max", [value, lo_name], [low], name=namer.max_node(value)))
            nodes.append(helper.make_node("Min", [low, hi_name], [q_in], name=namer.min_node(value)))
    q_out, dq_out = namer.quantized_value(value), namer.dequantized_value(value)
    q_attrs = {"output_dtype": ctype} if symmetric else {}
    nodes.append(helper.make_node("QuantizeLinear", [q_in, sname, *zp_inputs], [q_out],
                                  name=namer.quantize_node(value), **q_attrs))
    nodes.append(helper.make_node("DequantizeLinear", [q_out, sname, *zp_inputs], [dq_out],
                                  name=namer.dequantize_node(value)))
    return tensors, nodes, dq_out


def elem_types(model: onnx.ModelProto) -> dict[str, int]:
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.output, *g.value_info)}
    types.update({t.name: t.data_type for t in g.initializer})
    produced = {o for n in g.node for o in n.output if o}
    if produced - types.keys():
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
            types.update({v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info})
        except Exception:  # fall back to float32 for values inference cannot type
            pass
    return {k: v for k, v in types.items() if v}
