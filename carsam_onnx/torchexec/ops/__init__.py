"""ONNX op implementations in torch, registered by op type.

An implementation is a *builder*: `build(node: NodeCtx) -> fn`, called once per node when an
`OnnxModule` is constructed; it reads the node's attributes and opset there, and returns a callable
`fn(*inputs) -> Tensor | tuple[Tensor, ...]` that the executor calls on every run (missing optional
inputs are passed as None). Keeping attribute parsing out of `fn` keeps the per-run cost of a node at
one Python call.

`host_inputs` names the input positions whose *values* decide an output's shape (Reshape's shape,
Slice's starts...). They are read as Python numbers, and the executor keeps CPU copies of them, so
shape arithmetic never synchronises a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ...errors import ModelError, UnsupportedOpError


class RunState:
    """Per-module state shared by all nodes' callables: the device that tensors created from nothing
    (Range, ConstantOfShape, Shape...) go to. The executor sets it at the start of each run."""

    def __init__(self) -> None:
        self.device = torch.device("cpu")


@dataclass
class NodeCtx:
    """What a builder sees of a node."""

    node: onnx.NodeProto
    opset: int
    state: RunState
    attrs: dict[str, Any] = field(default_factory=dict)
    input_types: list[int] = field(default_factory=list)   # ONNX element types where known, else 0
    output_types: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.node.name or f"<unnamed {self.node.op_type} -> {list(self.node.output)}>"

    @property
    def num_inputs(self) -> int:
        return len(self.node.input)

    @property
    def num_outputs(self) -> int:
        return len(self.node.output)

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)

    def unsupported(self, what: str) -> UnsupportedOpError:
        return UnsupportedOpError(f"{self.node.op_type} node '{self.name}' (opset {self.opset}): {what} is not "
                                  "supported by the torch executor")


@dataclass(frozen=True)
class OpSpec:
    op_type: str
    build: Callable[[NodeCtx], Callable]
    host_inputs: frozenset[int] = frozenset()
    shape_only: bool = False            # output depends only on the input's shape (Shape, Size)
    data_dependent_shape: bool = False  # output shape depends on input values (NonZero)


REGISTRY: dict[str, OpSpec] = {}


def register(*op_types: str, host_inputs: tuple[int, ...] = (), shape_only: bool = False,
             data_dependent_shape: bool = False):
    def deco(build):
        for op in op_types:
            REGISTRY[op] = OpSpec(op, build, frozenset(host_inputs), shape_only, data_dependent_shape)
        return build
    return deco


def lookup(node: onnx.NodeProto, opset: int) -> OpSpec:
    if node.domain not in ("", "ai.onnx"):
        raise UnsupportedOpError(f"op {node.domain}::{node.op_type} (node '{node.name}', opset {opset}) is not "
                                 "supported by the torch executor (only the default ONNX domain is)")
    spec = REGISTRY.get(node.op_type)
    if spec is None:
        raise UnsupportedOpError(f"op {node.op_type} (node '{node.name}', opset {opset}) is not supported by the "
                                 "torch executor")
    return spec


def parse_attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out = {}
    for a in node.attribute:
        if a.ref_attr_name:
            raise UnsupportedOpError(f"{node.op_type} node '{node.name}': attribute references (functions) are not "
                                     "supported by the torch executor")
        if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            raise UnsupportedOpError(f"{node.op_type} node '{node.name}': subgraph attributes (If/Loop/Scan) are not "
                                     "supported by the torch executor")
        v = onnx.helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode()
        elif isinstance(v, list) and v and isinstance(v[0], bytes):
            v = [s.decode() for s in v]
        out[a.name] = v
    return out


# ---- dtypes -------------------------------------------------------------------------------------------

T = onnx.TensorProto
ONNX_TO_TORCH: dict[int, torch.dtype] = {
    T.FLOAT: torch.float32, T.DOUBLE: torch.float64, T.FLOAT16: torch.float16, T.BFLOAT16: torch.bfloat16,
    T.INT8: torch.int8, T.UINT8: torch.uint8, T.INT16: torch.int16, T.UINT16: torch.uint16,
    T.INT32: torch.int32, T.UINT32: torch.uint32, T.INT64: torch.int64, T.UINT64: torch.uint64,
    T.BOOL: torch.bool,
    # 4-bit integers have no torch dtype: they are held unpacked, one value per int8/uint8 element.
    T.INT4: torch.int8, T.UINT4: torch.uint8,
}
FLOAT_TYPES = (T.FLOAT, T.DOUBLE, T.FLOAT16, T.BFLOAT16)


def torch_dtype(onnx_type: int, where: str = "") -> torch.dtype:
    dt = ONNX_TO_TORCH.get(onnx_type)
    if dt is None:
        name = T.DataType.Name(onnx_type) if onnx_type in T.DataType.values() else str(onnx_type)
        raise UnsupportedOpError(f"{where}tensor type {name} is not supported by the torch executor")
    return dt


def tensor_from_proto(t: onnx.TensorProto, where: str = "") -> torch.Tensor:
    """A TensorProto as a CPU torch tensor (4-bit types unpacked into int8/uint8)."""
    if t.data_type in (T.STRING,):
        raise UnsupportedOpError(f"{where}string tensors are not supported by the torch executor")
    dt = torch_dtype(t.data_type, where)
    if t.data_location == T.EXTERNAL and not t.raw_data:
        raise ModelError(f"{where}initializer '{t.name}' has external data that was not loaded; load the model "
                         "with its .data file beside it")
    arr = numpy_helper.to_array(t)
    if t.data_type == T.BFLOAT16:
        return torch.from_numpy(np.array(arr, copy=True).view(np.uint16)).view(torch.bfloat16)
    if t.data_type in (T.INT4, T.UINT4):
        arr = arr.astype(np.int8 if t.data_type == T.INT4 else np.uint8)
    return torch.from_numpy(np.array(arr, copy=True)).to(dt)


def ints(v) -> list[int]:
    """A host input (1-D int tensor) as a list of Python ints."""
    return [int(x) for x in v.tolist()] if v.dim() else [int(v.item())]


# Register all implementations.
from . import elementwise, nn, quant, tensor  # noqa: E402,F401
