"""Checks before emission: opset, artifact completeness, plan/model agreement."""
from __future__ import annotations

import onnx

from ...artifact import CalibrationArtifact
from ...errors import ModelError
from ..sites import QuantPlan

MIN_OPSET = 21           # INT4 / UINT4 and blocked quantization in QuantizeLinear / DequantizeLinear


def check_opset(model: onnx.ModelProto) -> None:
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


def check_complete(model: onnx.ModelProto, plan: QuantPlan, artifact: CalibrationArtifact,
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
