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


def check_trt(model: onnx.ModelProto) -> list[Violation]:
    """Violations of TensorRT's documented Q/DQ rules, in graph order (see RULES and docs/tensorrt.md)."""
    G = _Graph(model)
    found: list[Violation] = []

    def add(node, rule, msg):
        found.append(Violation(node.name or f"<{node.op_type} {node.output[0]}>", rule, msg))

    for n in model.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        is_q = n.op_type == "QuantizeLinear"
        data, scale = n.input[0], n.input[1]
        zp = n.input[2] if len(n.input) > 2 and n.input[2] else None
        const_data = data in G.consts
        if is_q:
            qtype = G.types.get(zp) if zp else (_attr(n, "output_dtype", 0) or TensorProto.UINT8)
        else:
            qtype = G.types.get(data, 0)
        shape = G.shapes.get(data)
        block = _attr(n, "block_size", 0) or 0
        axis = _attr(n, "axis", 1)

        if qtype not in _QUANT_TYPES:
            add(n, "quantized-type", f"quantized type is {_tname(qtype)}; TensorRT takes INT8, INT4 or FP8 "
                                     "(use a signed container with zero point 0)")
        if zp:
            z = G.value(zp)
            if z is None:
                add(n, "zero-point", f"zero point {zp} is not a constant")
            elif np.any(z.astype(np.float64) != 0):
                add(n, "zero-point", f"zero point {zp} is not all zeros (TensorRT quantization is symmetric only)")
        s = G.value(scale)
        if s is None:
            add(n, "scale", f"scale {scale} is not a build-time constant")
        elif s.size == 0 or not np.all(np.isfinite(s)) or np.any(s <= 0):
            add(n, "scale", f"scale {scale} has values that are not finite and > 0")
        s_size = None if s is None else s.size
        s_shape = None if s is None else s.shape

        if not const_data and s_size is not None and s_size > 1:
            add(n, "activation-per-tensor", f"activation {data} is quantized with {s_size} scales; use one")
        if is_q and qtype == TensorProto.INT4 and not const_data:
            add(n, "int4-weight-only", f"activation {data} is quantized to INT4; TensorRT has INT4 only for "
                                       "weights (store activations in INT8 or keep them float)")
        if qtype == TensorProto.INT4 and shape and shape[-1] is not None and shape[-1] % 2:
            add(n, "int4-even-last-dim", f"INT4 tensor {data} has an odd last dimension {shape[-1]}")

        rank = len(shape) if shape is not None else None
        if block and not (not is_q and const_data):
            add(n, "block-weight-only", f"blocked quantization of {data}, which is not a constant weight")
        elif block:
            if rank is not None:
                ax = axis % rank if rank else 0
                if rank != 2:
                    add(n, "block-shape", f"blocked weight {data} has rank {rank}; TensorRT blocks 2-D weights")
                elif ax not in (rank - 1, rank - 2):
                    add(n, "block-shape", f"blocked along axis {ax}; TensorRT blocks one of the last two axes")
                if shape[ax] is not None and shape[ax] % block:
                    add(n, "block-shape", f"axis {ax} of {data} ({shape[ax]}) is not divisible by block size {block}")
            if qtype == TensorProto.INT8:
                add(n, "block-type", "blocked INT8 is documented only in recent TensorRT releases; use INT4")
        elif s_shape is not None and len(s_shape) == 1 and s_size > 1 and rank is not None:
            ax = axis % rank if rank else 0
            if shape[ax] is not None and shape[ax] != s_size:
                add(n, "per-channel-size", f"{s_size} scales for axis {ax} of size {shape[ax]}")

        if is_q:
            readers = G.consumers.get(n.output[0], [])
            bad = [r for r in readers if r.op_type != "DequantizeLinear"]
            if bad or n.output[0] in G.outputs:
                who = bad[0].op_type if bad else "a graph output"
                add(n, "q-dq-pair", f"QuantizeLinear output {n.output[0]} is read by {who}, not a DequantizeLinear")
            src = G.producer.get(data)
            if src is not None and src.op_type == "Clip":
                add(n, "narrow-grid-clip", f"Clip {src.name} before the Q (narrow grid) runs as its own layer")
            continue

        # DequantizeLinear of a constant: a weight
        if not const_data:
            continue
        readers = G.consumers.get(n.output[0], [])
        layers = [r for r in readers if r.op_type in _WEIGHT_INPUT and list(r.input).index(n.output[0]) == 1]
        others = [r for r in readers if r not in layers]
        if others:
            add(n, "weight-dq-placement", f"weight DQ output is read by {others[0].op_type} {others[0].name}; "
                                          "TensorRT wants the DQ directly on the layer's weight input")
        for layer in layers:
            if s_shape is not None and len(s_shape) == 1 and s_size > 1 and not block and rank:
                want = _out_channel_axis(layer, rank)
                if want is not None and axis % rank != want:
                    add(n, "weight-channel-axis", f"per-channel axis {axis % rank} but {layer.op_type} "
                                                  f"{layer.name} has its output channels on axis {want}")
            if qtype == TensorProto.INT4:
                src = G.producer.get(layer.input[0])
                if src is not None and src.op_type == "DequantizeLinear":
                    add(n, "int4-weight-only-layer", f"{layer.op_type} {layer.name} has INT4 weights and a quantized "
                                                     "input; TensorRT runs INT4 as weight-only (float activations)")
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
