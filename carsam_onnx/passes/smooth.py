"""Where activation scales can migrate into weights exactly (`--smooth`): a normalisation's affine parameters
followed only by quantized weight layers.

For a per-channel scale s > 0, a normalisation y = gamma * n + beta feeding a weight layer W (input channel c)
computes the same as (gamma / s) * n + (beta / s) feeding W with input channel c multiplied by s. Chosen well
(calib/smooth.py), s flattens the outlier channels of y, which a per-tensor activation quantizer otherwise
resolves with a handful of codes, and moves the difficulty into per-output-channel weight scales.

A pair is matched by two rules, on structure only:
- `LayerNormalization` over the last axis (its scale and bias initializers read by nothing else), whose output
  reaches quantized MatMul / Gemm weight layers only, through Reshape / Transpose / zero-Pad nodes that keep the
  channel axis last, as one quantized value (ViT blocks: norm1 -> window partition -> qkv, norm2 -> lin1);
- the decomposed LayerNorm2d affine `Add(Mul(x, gamma[C,1,1]), beta[C,1,1])` whose output feeds quantized Conv
  layers (group 1) only (SAM's neck: LayerNorm2d -> 3x3 conv).
A normalisation whose output also feeds anything else (SAM's two-way decoder: every norm's output is the next
residual stream too), or a weight layer kept float, matches nothing: scaling it would change the model.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .patterns import GraphIndex
from .sites import QuantPlan, WeightKind


@dataclass(frozen=True)
class SmoothPair:
    value: str                            # the quantized activation (the normalised value, or its channel-last
                                          # re-layout) the weight layers read: its channels get flattened
    gamma: str                            # affine scale initializer (divided by s)
    beta: str                             # affine bias initializer (divided by s)
    weights: tuple[tuple[str, int], ...]  # (weight initializer, its input-channel axis), multiplied by s
    channel_axis: int                     # channel axis of `value`
    channels: int


def _private_constant(g: GraphIndex, t: gs.Tensor, reader: gs.Node) -> gs.Constant | None:
    """`t` if it is an initializer read by `reader` alone (so rewriting it changes nothing else)."""
    return t if isinstance(t, gs.Constant) and [id(n) for n in g.consumers(t)] == [id(reader)] else None


def _input_axis(node: gs.Node, plan_weights: dict[str, object]) -> tuple[str, int] | None:
    """(weight initializer, input-channel axis) of a quantized weight layer reading its data on input 0."""
    if node.op not in ("MatMul", "Gemm", "Conv") or len(node.inputs) < 2:
        return None
    w = node.inputs[1]
    site = plan_weights.get(w.name)
    if site is None or site.node != node.name or site.kind is WeightKind.CONSTANT or len(w.outputs) != 1:
        return None                                   # (a weight another node reads too would change there)
    if node.op == "MatMul":
        return (w.name, 0) if len(w.shape) == 2 else None
    if node.op == "Gemm":
        if node.attrs.get("transA", 0):
            return None
        return w.name, 1 if node.attrs.get("transB", 0) else 0
    return (w.name, 1) if node.attrs.get("group", 1) == 1 else None


def _zero_pad_off_channels(g: GraphIndex, pad: gs.Node) -> bool:
    """A constant-mode Pad with value 0 that pads no channel (the last axis): scaled channels stay exact."""
    if pad.attrs.get("mode", "constant") != "constant" or len(pad.inputs) < 2 or len(pad.inputs) > 3:
        return False
    pads = g.constant_value(pad.inputs[1])
    value = g.constant_value(pad.inputs[2]) if len(pad.inputs) == 3 and pad.inputs[2].name else np.zeros(1)
    if pads is None or value is None or value.size != 1 or float(value.reshape(-1)[0]) != 0.0:
        return False
    rank = pads.size // 2
    return rank > 0 and pads[rank - 1] == 0 and pads[-1] == 0


def _last_axis_readers(g: GraphIndex, t: gs.Tensor, channels: int,
                       plan_weights) -> tuple[list[tuple[str, int]], set[str]] | None:
    """(weight layers reached from `t` through channel-last layout nodes, the values they read), or None if
    anything else reads `t` or a value on the way."""
    found: list[tuple[str, int]] = []
    read: set[str] = set()
    outputs = {x.name for x in g.graph.outputs}
    todo = [t]
    while todo:
        v = todo.pop()
        readers = g.consumers(v)
        if not readers or v.name in outputs:
            return None
        for n in readers:
            if n.inputs[0] is not v:
                return None
            shape = n.outputs[0].shape
            channel_last = bool(shape) and shape[-1] == channels
            if n.op == "Transpose" and list(n.attrs.get("perm", []))[-1:] == [len(n.attrs.get("perm", [])) - 1]:
                todo.append(n.outputs[0])
            elif n.op == "Reshape" and channel_last:
                todo.append(n.outputs[0])
            elif n.op == "Pad" and _zero_pad_off_channels(g, n):
                todo.append(n.outputs[0])
            else:
                w = _input_axis(n, plan_weights)
                if w is None:
                    return None
                found.append(w)
                read.add(v.name)
    return found, read


def _last_axis(norm: gs.Node) -> bool:
    axis, shape = norm.attrs.get("axis", -1), norm.inputs[0].shape
    return axis == -1 or (shape is not None and axis == len(shape) - 1)


def find_smooth_pairs(model: onnx.ModelProto, plan: QuantPlan) -> list[SmoothPair]:
    """Every normalisation -> weight-layer pair that scale migration can rewrite exactly (module docstring), whose
    normalised value is a quantized activation."""
    g = GraphIndex(model)
    plan_weights = {w.initializer: w for w in plan.weights}
    quantized = {a.value for a in plan.activations}
    pairs: list[SmoothPair] = []
    for n in g.graph.nodes:
        if n.op == "LayerNormalization" and len(n.inputs) >= 3 and _last_axis(n):
            gamma, beta = (_private_constant(g, t, n) for t in n.inputs[1:3])
            if gamma is None or beta is None or len(gamma.shape) != 1 or tuple(beta.shape) != tuple(gamma.shape):
                continue
            reached = _last_axis_readers(g, n.outputs[0], gamma.shape[0], plan_weights)
            if reached and len(reached[1]) == 1 and reached[1] <= quantized:   # one quantized value, read by all
                pairs.append(SmoothPair(reached[1].pop(), gamma.name, beta.name, tuple(reached[0]), -1,
                                        gamma.shape[0]))
        elif n.op == "Add":
            pair = _affine_2d(g, n, plan_weights, quantized)
            if pair is not None:
                pairs.append(pair)
    return pairs


def _affine_2d(g: GraphIndex, add: gs.Node, plan_weights, quantized) -> SmoothPair | None:
    """Add(Mul(x, gamma[C,1,1]), beta[C,1,1]) read only by quantized group-1 Convs (LayerNorm2d's affine)."""
    y = add.outputs[0]
    if y.name not in quantized:
        return None
    mul = next((g.producer(t) for t in add.inputs if g.producer(t) is not None and g.producer(t).op == "Mul"),
               None)
    if mul is None or len(g.consumers(mul.outputs[0])) != 1:
        return None
    beta = next((_private_constant(g, t, add) for t in add.inputs if isinstance(t, gs.Constant)), None)
    gamma = next((_private_constant(g, t, mul) for t in mul.inputs if isinstance(t, gs.Constant)), None)
    if beta is None or gamma is None:
        return None
    shape = gamma.values.shape
    if len(shape) != 3 or shape[1:] != (1, 1) or beta.values.shape != shape:
        return None
    readers = g.consumers(y)
    found = [_input_axis(r, plan_weights) for r in readers]
    if not readers or any(f is None or r.op != "Conv" or r.inputs[0] is not y for f, r in zip(found, readers)):
        return None
    if any(tuple(r.inputs[1].shape)[1] != shape[0] for r in readers):
        return None
    return SmoothPair(y.name, gamma.name, beta.name, tuple(found), 1, shape[0])
