"""Integer containers of the Q/DQ tensors: which ONNX type holds a grid, and integer initializers (INT4 packed)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ... import qmath

FLOAT_TYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}


def container_type(bits: int, signed: bool, container_bits: int | None = None) -> int:
    """ONNX element type holding a `bits`-wide grid (container_bits=8 forces an 8-bit container)."""
    width = max(qmath.container_bits(bits), container_bits or 0)
    if width == 4:
        return TensorProto.INT4 if signed else TensorProto.UINT4
    return TensorProto.INT8 if signed else TensorProto.UINT8


def int_tensor(name: str, values: np.ndarray, elem_type: int) -> onnx.TensorProto:
    """An integer initializer of `elem_type` (INT4/UINT4 packed two values a byte, low nibble first)."""
    values = np.asarray(values)
    dims = list(values.shape)
    if elem_type in (TensorProto.INT4, TensorProto.UINT4):
        return helper.make_tensor(name, elem_type, dims, qmath.pack_int4(values), raw=True)
    np_type = helper.tensor_dtype_to_np_dtype(elem_type)
    return numpy_helper.from_array(values.astype(np_type), name)




def unsigned_int_tensor(name: str, q: np.ndarray, offset: int) -> onnx.TensorProto:
    """A signed 8-bit grid `q` stored as UINT8 q + offset (int8_weights "u8": offset 128, the DQ's zero point)."""
    return int_tensor(name, np.asarray(q).astype(np.int16) + offset, TensorProto.UINT8)
