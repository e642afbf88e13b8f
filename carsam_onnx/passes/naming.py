"""Every name a pass adds to a graph comes from here.

The base names are readable and derived from the tensor they belong to ("x_scale", "x_QuantizeLinear", ...);
`Namer` makes them unique against every name already in the model (node names, value names, initializers,
graph inputs / outputs, value_info, subgraphs) and against the names it handed out before, by appending
"_1", "_2", ... A new name never reuses an existing one.
"""
from __future__ import annotations

from collections.abc import Iterable

import onnx

# Base names (before de-duplication). Kept as plain functions so tests and docs can state the scheme.


def quantized_weight_name(initializer: str) -> str:
    return f"{initializer}_quantized"


def scale_name(tensor: str) -> str:
    return f"{tensor}_scale"


def zero_point_name(tensor: str) -> str:
    return f"{tensor}_zero_point"


def quantize_node_name(tensor: str) -> str:
    return f"{tensor}_QuantizeLinear"


def dequantize_node_name(tensor: str) -> str:
    return f"{tensor}_DequantizeLinear"


def quantized_value_name(tensor: str) -> str:
    return f"{tensor}_q"


def dequantized_value_name(tensor: str) -> str:
    return f"{tensor}_dq"


def clip_node_name(tensor: str) -> str:
    return f"{tensor}_Clip"


def max_node_name(tensor: str) -> str:
    return f"{tensor}_Max"


def min_node_name(tensor: str) -> str:
    return f"{tensor}_Min"


def lower_clipped_value_name(tensor: str) -> str:
    return f"{tensor}_clipped_low"


def clipped_value_name(tensor: str) -> str:
    return f"{tensor}_clipped"


def clip_min_name(tensor: str) -> str:
    return f"{tensor}_clip_min"


def clip_max_name(tensor: str) -> str:
    return f"{tensor}_clip_max"


def quant_point_name(tensor: str) -> str:
    """The Identity in front of a value's quantized consumers while calibrating (never in an emitted file)."""
    return f"{tensor}__carsam_recon_q"


def graph_names(graph: onnx.GraphProto) -> set[str]:
    """All node, value and initializer names of `graph` and of its subgraphs."""
    names: set[str] = set()
    names.update(t.name for t in graph.initializer)
    names.update(t.values.name for t in graph.sparse_initializer)
    names.update(v.name for v in (*graph.input, *graph.output, *graph.value_info))
    for node in graph.node:
        names.add(node.name)
        names.update(node.input)
        names.update(node.output)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                names |= graph_names(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    names |= graph_names(g)
    names.discard("")
    return names


class Namer:
    """Hands out names unused in `model` (and unused by earlier calls)."""

    def __init__(self, model: onnx.ModelProto | None = None, reserved: Iterable[str] = ()):
        self._used: set[str] = graph_names(model.graph) if model is not None else set()
        self._used.update(reserved)

    def __contains__(self, name: str) -> bool:
        return name in self._used

    def fresh(self, base: str) -> str:
        name, i = base, 0
        while name in self._used:
            i += 1
            name = f"{base}_{i}"
        self._used.add(name)
        return name

    # Readable shortcuts
    def quantized_weight(self, initializer: str) -> str:
        return self.fresh(quantized_weight_name(initializer))

    def scale(self, tensor: str) -> str:
        return self.fresh(scale_name(tensor))

    def zero_point(self, tensor: str) -> str:
        return self.fresh(zero_point_name(tensor))

    def quantize_node(self, tensor: str) -> str:
        return self.fresh(quantize_node_name(tensor))

    def dequantize_node(self, tensor: str) -> str:
        return self.fresh(dequantize_node_name(tensor))

    def quantized_value(self, tensor: str) -> str:
        return self.fresh(quantized_value_name(tensor))

    def dequantized_value(self, tensor: str) -> str:
        return self.fresh(dequantized_value_name(tensor))

    def clip_node(self, tensor: str) -> str:
        return self.fresh(clip_node_name(tensor))

    def max_node(self, tensor: str) -> str:
        return self.fresh(max_node_name(tensor))

    def min_node(self, tensor: str) -> str:
        return self.fresh(min_node_name(tensor))

    def lower_clipped_value(self, tensor: str) -> str:
        return self.fresh(lower_clipped_value_name(tensor))

    def clipped_value(self, tensor: str) -> str:
        return self.fresh(clipped_value_name(tensor))

    def clip_min(self, tensor: str) -> str:
        return self.fresh(clip_min_name(tensor))

    def clip_max(self, tensor: str) -> str:
        return self.fresh(clip_max_name(tensor))

    def quant_point(self, tensor: str) -> str:
        return self.fresh(quant_point_name(tensor))
