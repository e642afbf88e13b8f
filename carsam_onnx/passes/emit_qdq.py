"""Write a QuantPlan + CalibrationArtifact into the graph as QuantizeLinear / DequantizeLinear (opset 21).

What it writes (docs/quantization_format.md):
- corrected float weights (artifact.float_weights) into their initializers, first;
- each WeightSite: the float initializer becomes an INT8 (grid bits > 4) or INT4 (bits <= 4, packed two a byte)
  initializer "<w>_quantized" + a DequantizeLinear (scale per output channel, `axis` = channel axis; or blocked:
  `axis` = input-channel axis, `block_size`) whose output replaces the weight in the site's node only. No
  zero point: weights are symmetric (ONNX default zero point 0). A float initializer nobody reads any more is
  dropped, so the file size reflects the bits;
- each ActivationSite: [Clip ->] QuantizeLinear -> DequantizeLinear on the value, per tensor: unsigned grids with
  a zero-point initializer of the container type (UINT8/UINT4); signed grids with zero point 0 (symmetric) as
  QuantizeLinear(output_dtype=INT8/INT4) without a zero-point input (see _activation_qdq); only the listed consumers are
  rewired, every other reader keeps the float value. The Clip (to the grid's real range) is there only when the
  grid is narrower than its container (2, 3, 5, 6, 7 bits); in a 4-bit container it is written as Max -> Min
  with the same bounds (onnxruntime cannot load a Clip feeding a 4-bit QuantizeLinear at its default level);
- artifact.info as model metadata "carsam.quant.<key>".
The result passes onnx.checker (full check) and carries inferred shapes. The input model is not modified.
"""
from __future__ import annotations

import os
import tempfile
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..artifact import ActivationQuant, CalibrationArtifact, WeightQuant
from ..config import QuantConfig
from ..errors import CarsamError, ModelError
from . import bits as B
from .naming import Namer
from .sites import QuantPlan

MIN_OPSET = 21           # INT4 / UINT4 and blocked quantization in QuantizeLinear / DequantizeLinear
META_PREFIX = "carsam.quant."

_FLOAT_TYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}


def container_type(bits: int, signed: bool, container_bits: int | None = None) -> int:
    """ONNX element type holding a `bits`-wide grid (container_bits=8 forces an 8-bit container)."""
    width = max(B.container_bits(bits), container_bits or 0)
    if width == 4:
        return TensorProto.INT4 if signed else TensorProto.UINT4
    return TensorProto.INT8 if signed else TensorProto.UINT8


def int_tensor(name: str, values: np.ndarray, elem_type: int) -> onnx.TensorProto:
    """An integer initializer of `elem_type` (INT4/UINT4 packed two values a byte, low nibble first)."""
    values = np.asarray(values)
    dims = list(values.shape)
    if elem_type in (TensorProto.INT4, TensorProto.UINT4):
        return helper.make_tensor(name, elem_type, dims, B.pack_int4(values), raw=True)
    np_type = helper.tensor_dtype_to_np_dtype(elem_type)
    return numpy_helper.from_array(values.astype(np_type), name)


def target_options(config: QuantConfig) -> dict:
    """emit_qdq keyword arguments for config.target.

    ort: natural containers (INT4/UINT4 for grids <= 4 bits).
    trt: TensorRT has INT4 only for weight-only quantization (docs/tensorrt.md), so when activations are quantized
    every grid goes in an 8-bit container (4-bit weights as INT8 values in [-8, 7], 2-4 bit activations as INT8
    behind a Clip); with float activations (a16) INT4 weights stay INT4. Activations must also be calibrated
    symmetric (config.symmetric_activations).
    """
    if config.target != "trt":
        return {"float_activations": not config.bits.quantize_activations}
    if not config.bits.quantize_activations:
        return {"float_activations": True}
    return {"float_activations": False, "weight_container_bits": 8, "activation_container_bits": 8}


@dataclass(frozen=True)
class EmitSummary:
    """What emit_qdq wrote (stored in metadata as carsam.quant.emitted)."""

    weights: int
    activations: int
    clips: int

    def __str__(self) -> str:
        return f"{self.weights} weights, {self.activations} activations, {self.clips} clips"


def emit_qdq(model: onnx.ModelProto, plan: QuantPlan, artifact: CalibrationArtifact, *,
             float_activations: bool = False, weight_container_bits: int | None = None,
             activation_container_bits: int | None = None) -> onnx.ModelProto:
    """Return a copy of `model` with the plan's sites quantized as Q/DQ (see the module docstring).

    float_activations: activations stay float (`a16`): activation sites are skipped and need no artifact entry.
    weight_container_bits / activation_container_bits: 8 stores grids of <= 4 bits in INT8/UINT8 instead of
    INT4/UINT4 (TensorRT has INT4 only for weight-only quantization); None: the natural container.
    Raises ModelError when the model does not fit the plan or the artifact lacks entries for plan sites.
    """
    for c in (weight_container_bits, activation_container_bits):
        if c not in (None, 4, 8):
            raise ModelError(f"container bits {c!r}: use 4, 8 or None")
    _check_opset(model)
    artifact.check_names(model)
    _check_complete(model, plan, artifact, float_activations)

    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    _write_float_weights(g, artifact.float_weights)

    namer = Namer(out)
    inits = {t.name: t for t in g.initializer}
    nodes = {n.name: n for n in g.node}
    producer = {o: i for i, n in enumerate(g.node) for o in n.output if o}
    head: list[onnx.NodeProto] = []                  # nodes placed before every original node
    after: dict[int, list[onnx.NodeProto]] = defaultdict(list)   # node index -> nodes right after it
    new_inits: list[onnx.TensorProto] = []

    # ---- weights
    dq_of: dict[str, str] = {}
    replaced: set[str] = set()
    for site in plan.weights:
        wq = artifact.weights[site.initializer]
        if site.initializer not in dq_of:
            tensors, node, dq_out = _weight_dq(inits[site.initializer], site.axis, wq, namer, weight_container_bits)
            new_inits += tensors
            head.append(node)
            dq_of[site.initializer] = dq_out
            replaced.add(site.initializer)
        _rewire(nodes[site.node], site.initializer, dq_of[site.initializer])

    # ---- activations
    n_act = n_clip = 0
    if not float_activations:
        elem_types = _elem_types(out)
        qdq_of: dict[str, str] = {}
        for site in plan.activations:
            aq = artifact.activations.get(site.value)
            if aq is None or aq.bits >= B.FLOAT_BITS:
                continue
            if site.value not in qdq_of:
                elem = elem_types.get(site.value, TensorProto.FLOAT)
                tensors, new_nodes, dq_out = _activation_qdq(site.value, elem, aq, namer, activation_container_bits)
                new_inits += tensors
                (after[producer[site.value]] if site.value in producer else head).extend(new_nodes)
                qdq_of[site.value] = dq_out
                n_act += 1
                n_clip += len(new_nodes) > 2
            for consumer in site.consumers:
                _rewire(nodes[consumer], site.value, qdq_of[site.value])

    # ---- assemble
    ordered = list(head)
    for i, n in enumerate(g.node):
        ordered.append(n)
        ordered.extend(after.get(i, ()))
    del g.node[:]
    g.node.extend(ordered)
    g.initializer.extend(new_inits)
    _drop_unread(g, replaced)
    summary = EmitSummary(len(dq_of), n_act, n_clip)
    _set_metadata(out, {**artifact.info, "emitted": str(summary)})
    return check_and_infer(out)


# ------------------------------------------------------------------------------------------- validation

def _check_opset(model: onnx.ModelProto) -> None:
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or opset < MIN_OPSET:
        raise ModelError(f"model has opset {opset}; Q/DQ emission needs opset >= {MIN_OPSET} "
                         f"(convert it with onnx.version_converter.convert_version(model, {MIN_OPSET}))")


def missing_entries(plan: QuantPlan, artifact: CalibrationArtifact, float_activations: bool = False) -> list[str]:
    """Plan sites that the artifact does not cover ("weight W", "activation V")."""
    missing = [f"weight {s.initializer}" for s in plan.weights if s.initializer not in artifact.weights]
    if not float_activations:
        missing += [f"activation {s.value}" for s in plan.activations if s.value not in artifact.activations]
    return sorted(set(missing))


def _check_complete(model: onnx.ModelProto, plan: QuantPlan, artifact: CalibrationArtifact,
                    float_activations: bool) -> None:
    missing = missing_entries(plan, artifact, float_activations)
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise ModelError(f"calibration artifact has no entry for {len(missing)} plan sites: {shown}")
    names = [n.name for n in model.graph.node]
    nodes = {n.name: n for n in model.graph.node}
    problems: list[str] = []
    needed = {s.node for s in plan.weights} | {c for s in plan.activations for c in s.consumers}
    dup = sorted(n for n in needed if names.count(n) > 1)
    problems += [f"node name {n!r} is not unique" for n in dup]
    inits = {t.name for t in model.graph.initializer}
    for s in plan.weights:
        if s.node not in nodes:
            problems.append(f"weight site node {s.node!r} not in the model")
        elif s.initializer not in inits:
            problems.append(f"weight site initializer {s.initializer!r} not in the model")
        elif s.initializer not in nodes[s.node].input:
            problems.append(f"node {s.node!r} does not read {s.initializer!r}")
    if not float_activations:
        for s in plan.activations:
            for c in s.consumers:
                if c not in nodes:
                    problems.append(f"activation consumer {c!r} not in the model")
                elif s.value not in nodes[c].input:
                    problems.append(f"node {c!r} does not read {s.value!r}")
    if problems:
        raise ModelError(f"quantization plan does not match the model: {'; '.join(problems[:3])}"
                         + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""))


# ---------------------------------------------------------------------------------------------- weights

def _write_float_weights(g: onnx.GraphProto, float_weights: dict[str, np.ndarray]) -> None:
    inits = {t.name: t for t in g.initializer}
    for name, value in float_weights.items():
        t = inits[name]
        if t.data_type not in _FLOAT_TYPES:
            raise ModelError(f"corrected weight {name}: initializer is not float32/float16")
        value = np.asarray(value)
        if tuple(value.shape) != tuple(t.dims):
            raise ModelError(f"corrected weight {name} has shape {value.shape}, the model's has {tuple(t.dims)}")
        if not np.all(np.isfinite(value)):
            raise ModelError(f"corrected weight {name} contains NaN or Inf")
        t.CopyFrom(numpy_helper.from_array(value.astype(_FLOAT_TYPES[t.data_type]), name))


def _weight_dq(t: onnx.TensorProto, axis: int, wq: WeightQuant, namer: Namer, container_bits: int | None):
    if t.data_type not in _FLOAT_TYPES:
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
        q = B.quantize_weight(w, wq)
        scale = np.asarray(wq.scale, dtype=np.float32)
        B.expand_scale(scale, w.shape, axis, wq.block_size)     # validates the scale shape
    except CarsamError as e:
        raise ModelError(f"weight {t.name}: {e}") from None
    if not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
        raise ModelError(f"weight {t.name}: scales must be finite and > 0")
    qname, sname = namer.quantized_weight(t.name), namer.scale(t.name)
    attrs: dict = {}
    if wq.block_size:
        attrs = {"axis": B.block_axis(ndim, axis), "block_size": int(wq.block_size)}
    elif scale.size == 1 and w.shape[axis] != 1:
        scale = scale.reshape(())                                # per tensor
    else:
        scale = scale.reshape(-1)
        attrs = {"axis": axis}
    tensors = [int_tensor(qname, q, container_type(wq.bits, True, container_bits)),
               numpy_helper.from_array(scale.astype(_FLOAT_TYPES[t.data_type]), sname)]
    dq_out = namer.dequantized_value(t.name)
    node = helper.make_node("DequantizeLinear", [qname, sname], [dq_out], name=namer.dequantize_node(t.name), **attrs)
    return tensors, node, dq_out


# ------------------------------------------------------------------------------------------ activations

def _check_activation(value: str, aq: ActivationQuant) -> None:
    try:
        B.check_bits(aq.bits)
    except CarsamError as e:
        raise ModelError(f"activation {value}: {e}") from None
    if not (np.isfinite(aq.scale) and aq.scale > 0):
        raise ModelError(f"activation {value}: scale {aq.scale} must be finite and > 0")
    if not aq.qmin <= aq.zero_point <= aq.qmax:
        raise ModelError(f"activation {value}: zero point {aq.zero_point} outside the grid [{aq.qmin}, {aq.qmax}]")


def _activation_qdq(value: str, elem: int, aq: ActivationQuant, namer: Namer, container_bits: int | None):
    _check_activation(value, aq)
    if elem not in _FLOAT_TYPES:
        raise ModelError(f"activation {value} is {TensorProto.DataType.Name(elem)}, expected FLOAT or FLOAT16")
    ftype = _FLOAT_TYPES[elem]
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
    container_range = B.grid(8 if ctype in (TensorProto.INT8, TensorProto.UINT8) else 4, aq.signed)
    if (aq.qmin, aq.qmax) != container_range:
        lo, hi = B.clip_range(aq)
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


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
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


# ------------------------------------------------------------------------------------------------ graph

def _rewire(node: onnx.NodeProto, old: str, new: str) -> None:
    for i, name in enumerate(node.input):
        if name == old:
            node.input[i] = new


def _read_names(g: onnx.GraphProto) -> set[str]:
    names = {o.name for o in g.output}
    for n in g.node:
        names.update(n.input)
        for a in n.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                names |= _read_names(sub)
    return names


def _drop_unread(g: onnx.GraphProto, candidates: set[str]) -> None:
    unread = candidates - _read_names(g)
    if not unread:
        return
    keep = [t for t in g.initializer if t.name not in unread]
    del g.initializer[:]
    g.initializer.extend(keep)
    inputs = [v for v in g.input if v.name not in unread]
    del g.input[:]
    g.input.extend(inputs)


def _set_metadata(model: onnx.ModelProto, info: dict[str, str]) -> None:
    keys = {META_PREFIX + k for k in info}
    keep = [p for p in model.metadata_props if p.key not in keys]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for k, v in sorted(info.items()):
        model.metadata_props.add(key=META_PREFIX + k, value=str(v))


MAX_INLINE_BYTES = 2**31 - 1   # protobuf limit: larger models are checked through a file with external data


def check_and_infer(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx.checker (full check, which includes strict shape inference) then shape inference; ModelError on failure.

    Models over 2 GB cannot be serialized in one piece; they are checked and inferred through a temporary file
    with external data (the returned model then holds its weights in memory again).
    """
    try:
        if model.ByteSize() <= MAX_INLINE_BYTES:
            onnx.checker.check_model(model, full_check=True)
            return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
        with tempfile.TemporaryDirectory(prefix="carsam_check_") as tmp:
            path = os.path.join(tmp, "model.onnx")
            onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                            location="model.onnx.data", size_threshold=1024)
            onnx.checker.check_model(path, full_check=True)
            onnx.shape_inference.infer_shapes_path(path, path, check_type=True, strict_mode=True)
            return onnx.load(path, load_external_data=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as e:
        first = (str(e).strip().splitlines() or ["no detail"])[0][:300]
        raise ModelError(f"emitted model fails the ONNX checker: {first}") from None
