"""Small graph-matching helpers over onnx-graphsurgeon, shared by the attention and plan passes.

`GraphIndex` wraps a `gs.Graph` imported from a ModelProto (read only: nothing here edits the graph) and
answers the questions the matching rules ask: who produces / consumes a value, is a value an activation
(it depends on a graph input through data, not only through Shape) or a constant, what is a constant's value,
and where does a walk through layout-only ops end.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import ModelError

# Ops whose output carries no activation data even when their input does (metadata / shape computations).
SHAPE_OPS = frozenset({"Shape", "Size", "Constant", "ConstantOfShape", "EyeLike", "RandomNormal", "RandomUniform"})

# Ops that only move, select or reshape data: one activation input, the others (if any) are constants or shapes.
LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Split", "Gather", "Slice", "Flatten",
                        "Identity", "Expand", "Cast", "Dropout"})

# Weight layers: (op, index of the weight input).
WEIGHT_OPS = {"MatMul": 1, "Gemm": 1, "Conv": 1, "ConvTranspose": 1}

SCOPES_KEY = "pkg.torch.onnx.name_scopes"  # module path kept in node metadata by the dynamo exporter


@dataclass(frozen=True)
class Walk:
    """Where a walk through pass-through ops stopped: `node` (None: graph input / constant), the value it
    reached, the pass-through nodes crossed on the way, and the scale nodes (Mul/Div by a constant scalar)."""

    node: gs.Node | None
    value: gs.Tensor
    crossed: tuple[gs.Node, ...]
    scales: tuple[gs.Node, ...]


class GraphIndex:
    """Read-only view of a model for matching rules. Node order is the model's (topological) order."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = gs.import_onnx(model)
        if len(self.graph.nodes) != len(model.graph.node):
            raise ModelError("onnx-graphsurgeon dropped nodes while importing the model; cannot match it")
        self.order = {id(n): i for i, n in enumerate(self.graph.nodes)}
        self._meta = [{p.key: p.value for p in n.metadata_props} for n in model.graph.node]
        self.inputs = {t.name for t in self.graph.inputs}
        self._data = self._data_values()
        seen: set[str] = set()
        self._duplicated = {n.name for n in self.graph.nodes if n.name in seen or seen.add(n.name)}

    # -- values -------------------------------------------------------------------------------------------
    def _data_values(self) -> set[str]:
        """Names of the values that carry activations: computed from a graph input through data ops."""
        data = set(self.inputs)
        for node in self.graph.nodes:
            if node.op in SHAPE_OPS:
                continue
            if any(t.name in data for t in node.inputs if t.name):
                data.update(t.name for t in node.outputs if t.name)
        return data

    def is_data(self, t: gs.Tensor) -> bool:
        return bool(t.name) and t.name in self._data

    def producer(self, t: gs.Tensor) -> gs.Node | None:
        return t.inputs[0] if t.inputs else None

    def consumers(self, t: gs.Tensor) -> list[gs.Node]:
        return list(t.outputs)

    def data_inputs(self, node: gs.Node) -> list[gs.Tensor]:
        return [t for t in node.inputs if self.is_data(t)]

    def constant_value(self, t: gs.Tensor, max_size: int = 1 << 20) -> np.ndarray | None:
        """The value of a constant (initializer, Constant node, or Identity/Cast of one); None otherwise."""
        for _ in range(8):
            if isinstance(t, gs.Constant):
                return np.asarray(t.values) if int(np.prod(t.shape)) <= max_size else None
            node = self.producer(t)
            if node is None:
                return None
            if node.op == "Constant":
                value = node.attrs.get("value")
                if isinstance(value, gs.Constant):
                    return np.asarray(value.values)
                for key in ("value_float", "value_int"):
                    if key in node.attrs:
                        return np.asarray(node.attrs[key])
                return None
            if node.op in ("Identity", "Cast") and node.inputs:
                t = node.inputs[0]
                continue
            return None
        return None

    def scalar(self, t: gs.Tensor) -> float | None:
        """A constant holding one number (any rank), or None."""
        if self.is_data(t):
            return None
        v = self.constant_value(t, max_size=1)
        return float(v.reshape(-1)[0]) if v is not None and v.size == 1 else None

    def initializer(self, t: gs.Tensor) -> gs.Constant | None:
        """The initializer behind `t` (directly or through Identity); None for Constant nodes / activations."""
        for _ in range(8):
            if isinstance(t, gs.Constant):
                return t
            node = self.producer(t)
            if node is None or node.op != "Identity":
                return None
            t = node.inputs[0]
        return None

    # -- nodes --------------------------------------------------------------------------------------------
    def name(self, node: gs.Node) -> str:
        """A node's name. Results are keyed by names, so an unnamed or duplicated one is a model error."""
        if not node.name or node.name in self._duplicated:
            what = f"an unnamed {node.op} node" if not node.name else f"two nodes named '{node.name}'"
            raise ModelError(f"the model has {what}; results are keyed by node names, so give every node a "
                             "unique name and retry")
        return node.name

    def index(self, node: gs.Node) -> int:
        return self.order[id(node)]

    def scopes(self, node: gs.Node) -> str:
        """The module path the dynamo exporter keeps in node metadata ('' when absent)."""
        return self._meta[self.index(node)].get(SCOPES_KEY, "")

    def weight_of(self, node: gs.Node) -> gs.Tensor | None:
        """The constant weight input of a MatMul/Gemm/Conv/ConvTranspose whose other operand is an activation."""
        if node.op not in WEIGHT_OPS or len(node.inputs) < 2:
            return None
        w, x = node.inputs[WEIGHT_OPS[node.op]], node.inputs[0]
        if self.is_data(w) or not self.is_data(x):
            return None
        return w

    def is_linear(self, node: gs.Node | None) -> bool:
        return node is not None and node.op in ("MatMul", "Gemm") and self.weight_of(node) is not None

    # -- walks --------------------------------------------------------------------------------------------
    def passes_through(self, node: gs.Node, scales: bool = True, bias: bool = True) -> gs.Tensor | None:
        """The single activation input of a pass-through node (layout op, Mul/Div by a constant scalar,
        Add/Sub of a constant), or None if `node` is not one."""
        data = self.data_inputs(node)
        if len(data) != 1:
            return None
        if node.op in LAYOUT_OPS and node.inputs[0] is data[0]:
            return data[0]
        others = [t for t in node.inputs if t is not data[0]]
        if scales and (node.op == "Mul" or (node.op == "Div" and node.inputs[0] is data[0])):
            return data[0] if len(others) == 1 and self.scalar(others[0]) is not None else None
        if bias and node.op in ("Add", "Sub"):
            return data[0]
        return None

    def walk_back(self, t: gs.Tensor, stop, max_steps: int = 16) -> Walk:
        """Follow producers from `t` through pass-through nodes until `stop(node)` is true or the chain ends."""
        crossed: list[gs.Node] = []
        scales: list[gs.Node] = []
        for _ in range(max_steps):
            node = self.producer(t)
            if node is None or stop(node):
                return Walk(node, t, tuple(crossed), tuple(scales))
            nxt = self.passes_through(node)
            if nxt is None:
                return Walk(node, t, tuple(crossed), tuple(scales))
            crossed.append(node)
            if node.op in ("Mul", "Div"):
                scales.append(node)
            t = nxt
        return Walk(self.producer(t), t, tuple(crossed), tuple(scales))

    def walk_forward(self, t: gs.Tensor, stop, max_steps: int = 16) -> tuple[gs.Node | None, str]:
        """Follow the single data consumer of `t` through layout ops until `stop(node)`; (node, '') or (None, why)."""
        for _ in range(max_steps):
            users = [n for n in self.consumers(t) if n.op not in SHAPE_OPS]  # Shape readers carry no data
            if len(users) != 1:
                return None, f"value '{t.name}' has {len(users)} consumers"
            node = users[0]
            if stop(node):
                return node, ""
            if node.op not in LAYOUT_OPS or self.passes_through(node) is not t:
                return None, f"reached {node.op} '{node.name}'"
            t = node.outputs[0]
        return None, "walk too long"

    def reachable_back(self, t: gs.Tensor, through: frozenset[str], max_nodes: int = 64) -> set[str]:
        """Names of the values reached backwards from `t` crossing only `through` ops (activations only)."""
        seen: set[str] = set()
        stack = [t]
        while stack and len(seen) < max_nodes:
            v = stack.pop()
            if v.name in seen or not self.is_data(v):
                continue
            seen.add(v.name)
            node = self.producer(v)
            if node is not None and node.op in through:
                stack.extend(node.inputs)
        return seen

    def depends_on(self, t: gs.Tensor, node: gs.Node) -> bool:
        """True if value `t` is computed (through any ops) from an output of `node`."""
        targets = {o.name for o in node.outputs}
        first = self.index(node)
        seen: set[str] = set()
        stack = [t]
        while stack:
            v = stack.pop()
            if v.name in targets:
                return True
            if v.name in seen:
                continue
            seen.add(v.name)
            producer = self.producer(v)
            if producer is not None and self.index(producer) > first:  # topological order: earlier nodes
                stack.extend(producer.inputs)                          # cannot depend on `node`
        return False
