"""Write a QuantPlan + CalibrationArtifact into the graph as QuantizeLinear / DequantizeLinear (opset 21).

What it writes (docs/quantization_format.md):
- corrected float weights (artifact.float_weights) into their initializers, first;
- each WeightSite: the float initializer becomes an INT8 (grid bits > 4) or INT4 (bits <= 4, packed two a byte)
  initializer "<w>_quantized" + a DequantizeLinear (scale per output channel, `axis` = channel axis; or blocked:
  `axis` = input-channel axis, `block_size`) whose output replaces the weight in the site's node only. No
  zero point: weights are symmetric (ONNX default zero point 0). With unsigned_weights (int8_weights "u8"), 8-bit
  layer weights are stored as UINT8 q + 128 with a zero point of 128 (same values, ONNX Runtime's U8U8 kernels).
  A float initializer nobody reads any more is dropped, so the file size reflects the bits;
- each ActivationSite: [Clip ->] QuantizeLinear -> DequantizeLinear on the value, per tensor: unsigned grids with
  a zero-point initializer of the container type (UINT8/UINT4); signed grids with zero point 0 (symmetric) as
  QuantizeLinear(output_dtype=INT8/INT4) without a zero-point input (see activations.py); only the listed consumers are
  rewired, every other reader keeps the float value. The Clip (to the grid's real range) is there only when the
  grid is narrower than its container (2, 3, 5, 6, 7 bits); in a 4-bit container it is written as Max -> Min
  with the same bounds (onnxruntime cannot load a Clip feeding a 4-bit QuantizeLinear at its default level);
- artifact.info as model metadata "carsam.quant.<key>", and the ONNX Runtime session config entries the model needs
  as "carsam.ort_session_config" (JSON; graph.py ORT_SESSION_CONFIG, applied by runtime/ort_settings.py).
The result passes onnx.checker (full check) and carries inferred shapes. The input model is not modified.

Split by concern: targets.py (what each deployment target needs), validate.py (checks before writing),
weights.py and activations.py (the writers), containers.py (integer types and initializers), graph.py (rewiring,
metadata, the final check).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import onnx

from ... import qmath
from ...artifact import CalibrationArtifact
from ...errors import ModelError
from ..naming import Namer
from ..sites import QuantPlan, WeightKind
from .activations import activation_qdq, elem_types
from .containers import container_type, int_tensor
from .graph import (META_PREFIX, ORT_SESSION_CONFIG, ORT_SESSION_CONFIG_KEY, check_and_infer, drop_unread,
                    record_session_config, rewire, set_metadata)
from .targets import target_options
from .validate import MIN_OPSET, check_complete, check_opset, missing_entries
from .weights import unsigned_weight_offset, weight_dq, write_float_weights

__all__ = ["emit_qdq", "EmitSummary", "target_options", "missing_entries", "check_and_infer", "container_type",
           "int_tensor", "META_PREFIX", "MIN_OPSET", "ORT_SESSION_CONFIG", "ORT_SESSION_CONFIG_KEY",
           "unsigned_weight_offset"]


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
             activation_container_bits: int | None = None, unsigned_weights: bool = False) -> onnx.ModelProto:
    """Return a copy of `model` with the plan's sites quantized as Q/DQ (see the module docstring).

    float_activations: activations stay float (`a16`): activation sites are skipped and need no artifact entry.
    weight_container_bits / activation_container_bits: 8 stores grids of <= 4 bits in INT8/UINT8 instead of
    INT4/UINT4 (TensorRT has INT4 only for weight-only quantization); None: the natural container.
    unsigned_weights: 8-bit grids of layer weights (not position tables) go in UINT8 with zero point 128
    (int8_weights "u8", config.py).
    Raises ModelError when the model does not fit the plan or the artifact lacks entries for plan sites.
    """
    for c in (weight_container_bits, activation_container_bits):
        if c not in (None, 4, 8):
            raise ModelError(f"container bits {c!r}: use 4, 8 or None")
    check_opset(model)
    artifact.check_names(model)
    check_complete(model, plan, artifact, float_activations)

    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    write_float_weights(g, artifact.float_weights)

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
            offset = unsigned_weight_offset(wq) if unsigned_weights and site.kind is not WeightKind.CONSTANT else 0
            tensors, node, dq_out = weight_dq(inits[site.initializer], site.axis, wq, namer, weight_container_bits,
                                              offset)
            new_inits += tensors
            head.append(node)
            dq_of[site.initializer] = dq_out
            replaced.add(site.initializer)
        rewire(nodes[site.node], site.initializer, dq_of[site.initializer])

    # ---- activations
    n_act = n_clip = 0
    if not float_activations:
        types = elem_types(out)
        qdq_of: dict[str, str] = {}
        for site in plan.activations:
            aq = artifact.activations.get(site.value)
            if aq is None or aq.bits >= qmath.FLOAT_BITS:
                continue
            if site.value not in qdq_of:
                elem = types.get(site.value, onnx.TensorProto.FLOAT)
                tensors, new_nodes, dq_out = activation_qdq(site.value, elem, aq, namer, activation_container_bits)
                new_inits += tensors
                (after[producer[site.value]] if site.value in producer else head).extend(new_nodes)
                qdq_of[site.value] = dq_out
                n_act += 1
                n_clip += len(new_nodes) > 2
            for consumer in site.consumers:
                rewire(nodes[consumer], site.value, qdq_of[site.value])

    # ---- assemble
    ordered = list(head)
    for i, n in enumerate(g.node):
        ordered.append(n)
        ordered.extend(after.get(i, ()))
    del g.node[:]
    g.node.extend(ordered)
    g.initializer.extend(new_inits)
    drop_unread(g, replaced)
    summary = EmitSummary(len(dq_of), n_act, n_clip)
    set_metadata(out, {**artifact.info, "emitted": str(summary)})
    record_session_config(out)
    return check_and_infer(out)
