"""Static check of a Q/DQ ONNX graph against TensorRT's documented explicit-quantization rules.

These are checks of documented rules (docs/tensorrt.md lists each rule with its source), run on the ONNX
graph without TensorRT: they catch what the TensorRT ONNX parser / builder is documented to reject ("error")
and what builds but does not run as intended ("warning"). A clean report is not a TensorRT build.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

ERROR, WARNING = "error", "warning"

# rule id -> (severity, what it checks). Sources: docs/tensorrt.md.
RULES: dict[str, tuple[str, str]] = {
    "quantized-type": (ERROR, "Q output / DQ input type is INT8, INT4 or FP8 (no UINT8/UINT4 quantization)"),
    "zero-point": (ERROR, "zero point, if given, is a constant of zeros (TensorRT quantization is symmetric)"),
    "scale": (ERROR, "scale is a build-time constant with all values finite and > 0"),
    "activation-per-tensor": (ERROR, "Q/DQ of a non-constant tensor uses one scale (per-tensor)"),
    "int4-weight-only": (ERROR, "INT4 only for weights (weight-only quantization): no QuantizeLinear to INT4"),
    "int4-weight-only-layer": (WARNING, "an INT4 weight feeds a layer whose activation input is quantized too"),
    "int4-even-last-dim": (ERROR, "an INT4 tensor has an even last dimension (two values per byte)"),
    "per-channel-size": (ERROR, "a 1-D scale has one value per element of the quantized axis"),
    "weight-channel-axis": (ERROR, "per-channel weight scales run along the consuming layer's output-channel axis"),
    "block-weight-only": (ERROR, "blocked quantization only on constant weights (DequantizeLinear of an initializer)"),
    "block-shape": (ERROR, "blocked weights are 2-D, blocked along a last-two axis whose size the block divides"),
    "block-type": (WARNING, "blocked quantization of INT8 needs a recent TensorRT (documented for INT4 first)"),
    "q-dq-pair": (ERROR, "every QuantizeLinear output is read only by DequantizeLinear nodes"),
    "weight-dq-placement": (WARNING, "a weight DequantizeLinear feeds a Conv/ConvTranspose/MatMul/Gemm weight directly"),
    "narrow-grid-clip": (WARNING, "a Clip before QuantizeLinear (grid narrower than INT8) runs as a separate layer"),
}

_QUANT_TYPES = {TensorProto.INT8, TensorProto.INT4, TensorProto.FLOAT8E4M3FN}
_WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "MatMul": 1, "Gemm": 1}


@dataclass(frozen=True)
class Violation:
    node: str
    rule: str
    message: str

    @property
    def severity(self) -> str:
        return RULES[self.rule][0]

    def __str__(self) -> str:
        return f"{self.severity}: {self.node}: [{self.rule}] {self.message}"


class _Graph:
    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
            vinfo = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
        except Exception:  # > 2 GB or inference failure: use what the model states
            vinfo = [*g.value_info, *g.input, *g.output]
        self.types: dict[str, int] = {}
        self.shapes: dict[str, tuple[int | None, ...]] = {}
        for v in vinfo:
            tt = v.type.tensor_type
            if tt.elem_type:
                self.types[v.name] = tt.elem_type
            if tt.HasField("shape"):
                self.shapes[v.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
        self.consts: dict[str, onnx.TensorProto] = {t.name: t for t in g.initializer}
        for n in g.node:
            if n.op_type == "Constant" and n.output:
                a = next((a for a in n.attribute if a.name == "value"), None)
                if a is not None:
                    self.consts[n.output[0]] = a.t
        for name, t in self.consts.items():
            self.types[name] = t.data_type
            self.shapes[name] = tuple(t.dims)
        self.producer = {o: n for n in g.node for o in n.output if o}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in g.node:
            for i in n.input:
                if i:
                    self.consumers[i].append(n)
        self.outputs = {o.name for o in g.output}

    def value(self, name: str) -> np.ndarray | None:
        t = self.consts.get(name)
        if t is None:
            return None
        try:
            return numpy_helper.to_array(t)
        except Exception:
            return None


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _out_channel_axis(layer: onnx.NodeProto, rank: int) -> int | None:
    if layer.op_type == "Conv":
        return 0
    if layer.op_type == "ConvTranspose":
        return 1
    if layer.op_type == "Gemm":
        return 0 if _attr(layer, "transB", 0) else 1
    if layer.op_type == "MatMul":
        return rank - 1
    return None


def _tname(t: int) -> str:
    return TensorProto.DataType.Name(t) if t else "unknown"


@dataclass(frozen=True)
class QdqNode:
    """One QuantizeLinear / DequantizeLinear as the rules see it."""

    node: onnx.NodeProto
    is_q: bool
    data: str                       # the quantized (Q) or dequantized (DQ) tensor
    scale_name: str
    zp: str | None
    const_data: bool                # data is a constant: a weight
    qtype: int                      # the integer type (Q output / DQ input)
    shape: tuple | None
    block: int
    axis: int
    scale: np.ndarray | None        # None when the scale is not a build-time constant

    @property
    def rank(self) -> int | None:
        return len(self.shape) if self.shape is not None else None


def _qdq(G: _Graph, n: onnx.NodeProto) -> QdqNode:
    is_q = n.op_type == "QuantizeLinear"
    data = n.input[0]
    zp = n.input[2] if len(n.input) > 2 and n.input[2] else None
    qtype = (G.types.get(zp) if zp else (_attr(n, "output_dtype", 0) or TensorProto.UINT8)) if is_q \
        else G.types.get(data, 0)
    return QdqNode(n, is_q, data, n.input[1], zp, data in G.consts, qtype, G.shapes.get(data),
                   _attr(n, "block_size", 0) or 0, _attr(n, "axis", 1), G.value(n.input[1]))


# ---- the rules: each yields (rule id, message) for one Q/DQ node ------------------------------------------

def rule_quantized_type(G: _Graph, q: QdqNode):
    if q.qtype not in _QUANT_TYPES:
        yield "quantized-type", (f"quantized type is {_tname(q.qtype)}; TensorRT takes INT8, INT4 or FP8 "
                                 "(use a signed container with zero point 0)")


def rule_zero_point(G: _Graph, q: QdqNode):
    if q.zp:
        z = G.value(q.zp)
        if z is None:
            yield "zero-point", f"zero point {q.zp} is not a constant"
        elif np.any(z.astype(np.float64) != 0):
            yield "zero-point", f"zero point {q.zp} is not all zeros (TensorRT quantization is symmetric only)"


def rule_scale(G: _Graph, q: QdqNode):
    s = q.scale
    if s is None:
        yield "scale", f"scale {q.scale_name} is not a build-time constant"
    elif s.size == 0 or not np.all(np.isfinite(s)) or np.any(s <= 0):
        yield "scale", f"scale {q.scale_name} has values that are not finite and > 0"


def rule_activation_per_tensor(G: _Graph, q: QdqNode):
    if not q.const_data and q.scale is not None and q.scale.size > 1:
        yield "activation-per-tensor", f"activation {q.data} is quantized with {q.scale.size} scales; use one"


def rule_int4_weight_only(G: _Graph, q: QdqNode):
    if q.is_q and q.qtype == TensorProto.INT4 and not q.const_data:
        yield "int4-weight-only", (f"activation {q.data} is quantized to INT4; TensorRT has INT4 only for "
                                   "weights (store activations in INT8 or keep them float)")


def rule_int4_even_last_dim(G: _Graph, q: QdqNode):
    if q.qtype == TensorProto.INT4 and q.shape and q.shape[-1] is not None and q.shape[-1] % 2:
        yield "int4-even-last-dim", f"INT4 tensor {q.data} has an odd last dimension {q.shape[-1]}"


def rule_block_weight_only(G: _Graph, q: QdqNode):
    if q.block and not (not q.is_q and q.const_data):
        yield "block-weight-only", f"blocked quantization of {q.data}, which is not a constant weight"


def _is_blocked_weight(q: QdqNode) -> bool:
    return bool(q.block) and not q.is_q and q.const_data


def rule_block_shape(G: _Graph, q: QdqNode):
    if not _is_blocked_weight(q) or q.rank is None:
        return
    ax = q.axis % q.rank if q.rank else 0
    if q.rank != 2:
        yield "block-shape", f"blocked weight {q.data} has rank {q.rank}; TensorRT blocks 2-D weights"
    elif ax not in (q.rank - 1, q.rank - 2):
        yield "block-shape", f"blocked along axis {ax}; TensorRT blocks one of the last two axes"
    if q.shape[ax] is not None and q.shape[ax] % q.block:
        yield "block-shape", f"axis {ax} of {q.data} ({q.shape[ax]}) is not divisible by block size {q.block}"


def rule_block_type(G: _Graph, q: QdqNode):
    if _is_blocked_weight(q) and q.qtype == TensorProto.INT8:
        yield "block-type", "blocked INT8 is documented only in recent TensorRT releases; use INT4"


def rule_per_channel_size(G: _Graph, q: QdqNode):
    s = q.scale
    if q.block or s is None or s.ndim != 1 or s.size <= 1 or q.rank is None:
        return
    ax = q.axis % q.rank if q.rank else 0
    if q.shape[ax] is not None and q.shape[ax] != s.size:
        yield "per-channel-size", f"{s.size} scales for axis {ax} of size {q.shape[ax]}"


def rule_q_dq_pair(G: _Graph, q: QdqNode):
    if not q.is_q:
        return
    out = q.node.output[0]
    bad = [r for r in G.consumers.get(out, []) if r.op_type != "DequantizeLinear"]
    if bad or out in G.outputs:
        who = bad[0].op_type if bad else "a graph output"
        yield "q-dq-pair", f"QuantizeLinear output {out} is read by {who}, not a DequantizeLinear"


def rule_narrow_grid_clip(G: _Graph, q: QdqNode):
    src = G.producer.get(q.data) if q.is_q else None
    if src is not None and src.op_type == "Clip":
        yield "narrow-grid-clip", f"Clip {src.name} before the Q (narrow grid) runs as its own layer"


def _weight_layers(G: _Graph, q: QdqNode) -> tuple[list, list]:
    """(layers reading this weight DQ as their weight input, other readers); empty unless a weight DQ."""
    if q.is_q or not q.const_data:
        return [], []
    readers = G.consumers.get(q.node.output[0], [])
    layers = [r for r in readers if r.op_type in _WEIGHT_INPUT and list(r.input).index(q.node.output[0]) == 1]
    return layers, [r for r in readers if r not in layers]


def rule_weight_dq_placement(G: _Graph, q: QdqNode):
    _, others = _weight_layers(G, q)
    if others:
        yield "weight-dq-placement", (f"weight DQ output is read by {others[0].op_type} {others[0].name}; "
                                      "TensorRT wants the DQ directly on the layer's weight input")


def rule_weight_channel_axis(G: _Graph, q: QdqNode):
    s = q.scale
    if s is None or s.ndim != 1 or s.size <= 1 or q.block or not q.rank:
        return
    for layer in _weight_layers(G, q)[0]:
        want = _out_channel_axis(layer, q.rank)
        if want is not None and q.axis % q.rank != want:
            yield "weight-channel-axis", (f"per-channel axis {q.axis % q.rank} but {layer.op_type} "
                                          f"{layer.name} has its output channels on axis {want}")


def rule_int4_weight_only_layer(G: _Graph, q: QdqNode):
    if q.qtype != TensorProto.INT4:
        return
    for layer in _weight_layers(G, q)[0]:
        src = G.producer.get(layer.input[0])
        if src is not None and src.op_type == "DequantizeLinear":
            yield "int4-weight-only-layer", (f"{layer.op_type} {layer.name} has INT4 weights and a quantized "
                                             "input; TensorRT runs INT4 as weight-only (float activations)")


CHECKS = (rule_quantized_type, rule_zero_point, rule_scale, rule_activation_per_tensor, rule_int4_weight_only,
          rule_int4_even_last_dim, rule_block_weight_only, rule_block_shape, rule_block_type, rule_per_channel_size,
          rule_q_dq_pair, rule_narrow_grid_clip, rule_weight_dq_placement, rule_weight_channel_axis,
          rule_int4_weight_only_layer)


def check_trt(model: onnx.ModelProto) -> list[Violation]:
    """Violations of TensorRT's documented Q/DQ rules, in graph order (see RULES and docs/tensorrt.md)."""
    G = _Graph(model)
    found: list[Violation] = []
    for n in model.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        q = _qdq(G, n)
        name = n.name or f"<{n.op_type} {n.output[0]}>"
        for check in CHECKS:
            found.extend(Violation(name, rule, msg) for rule, msg in check(G, q))
    return found


def errors(violations: list[Violation]) -> list[Violation]:
    return [v for v in violations if v.severity == ERROR]


def format_report(violations: list[Violation], limit: int = 20) -> str:
    """Counts per rule, then the first `limit` violations, one a line."""
    if not violations:
        return "no TensorRT Q/DQ rule violations found (static check, not a TensorRT build)"
    counts: dict[str, int] = defaultdict(int)
    for v in violations:
        counts[v.rule] += 1
    head = ", ".join(f"{r}: {c}" for r, c in sorted(counts.items()))
    lines = [f"{len(errors(violations))} errors, {len(violations) - len(errors(violations))} warnings ({head})"]
    lines += [str(v) for v in violations[:limit]]
    if len(violations) > limit:
        lines.append(f"... {len(violations) - limit} more")
    return "\n".join(lines)
