"""Weight writers: corrected float weights, and quantized initializer + DequantizeLinear per weight."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ... import qmath
from ...errors import CarsamError, ModelError
from ...qmath import WeightQuant
from ..naming import Namer
from .containers import FLOAT_TYPES, container_type, int_tensor, unsigned_int_tensor


def write_float_weights(g: onnx.GraphProto, float_weights: dict[str, np.ndarray]) -> None:
    inits = {t.name: t for t in g.initializer}
    for name, value in float_weights.items():
        t = inits[name]
        if t.data_type not in FLOAT_TYPES:
            raise ModelError(f"corrected weight {name}: initializer is not float32/float16")
        value = np.asarray(value)
        if tuple(value.shape) != tuple(t.dims):
            raise ModelError(f"corrected weight {name} has shape {value.shape}, the model's has {tuple(t.dims)}")
        if not np.all(np.isfinite(value)):
            raise ModelError(f"corrected weight {name} contains NaN or Inf")
        t.CopyFrom(numpy_helper.from_array(value.astype(FLOAT_TYPES[t.data_type]), name))


def unsigned_weight_offset(wq: WeightQuant) -> int:
    """Zero point that stores wq's signed grid unsigned: 128 for an 8-bit grid, 0 (stay signed) otherwise."""
    return 128 if wq.bits == 8 else 0


def weight_dq(t: onnx.TensorProto, axis: int, wq: WeightQuant, namer: Namer, container_bits: int | None,
              offset: int = 0):
    if t.data_type not in FLOAT_TYPES:
        raise ModelError(f"weight {t.name} is {TensorProto.DataType.Name(t.data_type)}, expected FLOAT or FLOAT16")
    try:
        w = numpy_helper.to_array(t)
    except Exception as e:  # external data not loaded, truncated raw data
        raise ModelError(f"cannot read weight {t.name} ({type(e).__name__}); "
                         "load the model with its external data") from None
    ndim = w.ndim
    if ndim == 0 or not -ndim <= axis < ndim:
        raise ModelError(f"weight {t.name}: axis {axis} is invalid for shape {w.shape}")
    axis %= ndim
    if wq.axis % ndim != axis:
        raise ModelError(f"weight {t.name}: artifact axis {wq.axis} differs from the plan's axis {axis}")
    try:
        q = qmath.quantize_weight(w, wq)
        scale = np.asarray(wq.scale, dtype=np.float32)
        qmath.expand_scale(scale, w.shape, axis, wq.block_size)     # validates the scale shape
    except CarsamError as e:
        raise ModelError(f"weight {t.name}: {e}") from None
    if not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
        raise ModelError(f"weight {t.name}: scales must be finite and > 0")
    qname, sname = namer.quantized_weight(t.name), namer.scale(t.name)
    attrs: dict = {}
    if wq.block_size:
        attrs = {"axis": qmath.block_axis(ndim, axis), "block_size": int(wq.block_size)}
    elif scale.size == 1 and w.shape[axis] != 1:
        scale = scale.reshape(())                                # per tensor
    else:
        scale = scale.reshape(-1)
        attrs = {"axis": axis}
    inputs = [qname, sname]
    if offset:   # unsigned storage: UINT8 q + offset, zero point = offset (same shape as the scale)
        zname = namer.zero_point(t.name)
        tensors = [unsigned_int_tensor(qname, q, offset),
                   numpy_helper.from_array(scale.astype(FLOAT_TYPES[t.data_type]), sname),
                   int_tensor(zname, np.full(scale.shape, offset), TensorProto.UINT8)]
        inputs.append(zname)
    else:
        tensors = [int_tensor(qname, q, container_type(wq.bits, True, container_bits)),
                   numpy_helper.from_array(scale.astype(FLOAT_TYPES[t.data_type]), sname)]
    dq_out = namer.dequantized_value(t.name)
    node = helper.make_node("DequantizeLinear", inputs, [dq_out], name=namer.dequantize_node(t.name), **attrs)
    return tensors, node, dq_out
