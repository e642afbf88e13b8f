"""Quant points: the calibration-time graph in which every activation site can be fake-quantized exactly where
the emitted Q/DQ model quantizes it.

For each activation site v the copy gets `v_q = Identity(v)`, and only the site's listed consumers read v_q;
other readers of v (a residual add, a float layer) keep reading v, as in the emitted file. The torch executor
replaces each Identity's output with the site's quantizer (reconstruction, MAC); without replacements the copy
computes what the model computes.
"""
from __future__ import annotations

import onnx
from onnx import helper

from .naming import Namer
from .sites import QuantPlan


def insert_quant_points(model: onnx.ModelProto, plan: QuantPlan) -> tuple[onnx.ModelProto, dict[str, str]]:
    """(a copy of `model` with a quant point per activation site of `plan`, {value: its quant point's name})."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    namer = Namer(m)
    qname: dict[str, str] = {}
    consumers: dict[str, set[str]] = {}
    for a in plan.activations:
        qname[a.value] = namer.quant_point(a.value)
        consumers[a.value] = set(a.consumers)
    for n in m.graph.node:
        for j, x in enumerate(n.input):
            if x in qname and n.name in consumers[x]:
                n.input[j] = qname[x]
    # appended after every node, not next to their producers: the executor orders by dependencies, and this
    # order is the one QDrop's random draws followed when docs/results.md's figures were made (a sorted copy
    # draws in another order: other masks, other bytes for the same seed)
    m.graph.node.extend(helper.make_node("Identity", [v], [q], name=q) for v, q in qname.items())
    return m, qname
