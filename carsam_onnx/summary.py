"""`inspect`: what an ONNX model holds — I/O, opset, op counts, parameters, metadata (and attention sites)."""
from __future__ import annotations

from collections import Counter

import onnx

_SUB_BYTE = {onnx.TensorProto.INT4: 0.5, onnx.TensorProto.UINT4: 0.5}


def _dims(vi: onnx.ValueInfoProto) -> list:
    shape = vi.type.tensor_type.shape
    return [d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else "?")
            for d in shape.dim]


def _io(vis) -> list[dict]:
    return [{"name": v.name, "dtype": onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type).lower(),
             "shape": _dims(v)} for v in vis]


def _numel(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n


def _nbytes(t: onnx.TensorProto) -> int:
    per = _SUB_BYTE.get(t.data_type) or onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return int(-(-_numel(t) * per // 1))


def _constant_tensors(model: onnx.ModelProto):
    yield from model.graph.initializer
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    yield a.t


def summarize(model: onnx.ModelProto, with_attention: bool = True) -> dict:
    """A JSON-ready description of `model` (keys: opset, inputs, outputs, op_counts, num_parameters, ...)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    tensors = list(_constant_tensors(model))
    dtypes = Counter()
    for t in tensors:
        dtypes[onnx.TensorProto.DataType.Name(t.data_type).lower()] += _numel(t)
    info = {
        "opset": opset,
        "ir_version": model.ir_version,
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "inputs": _io(model.graph.input),
        "outputs": _io(model.graph.output),
        "num_nodes": len(model.graph.node),
        "op_counts": dict(sorted(Counter(n.op_type for n in model.graph.node).items())),
        "num_parameters": sum(_numel(t) for t in tensors),
        "parameter_bytes": sum(_nbytes(t) for t in tensors),
        "parameters_by_dtype": dict(dtypes),
        "metadata": {p.key: p.value for p in model.metadata_props},
    }
    if with_attention:
        from .passes.attention import inspect_attention

        info.update(inspect_attention(model))   # keys "attention" and "attention_rejected"
        info["units"] = _units(model)
    return info


def _units(model: onnx.ModelProto) -> list[dict]:
    """Reconstruction units (`--method recon`) under the default plan (passes/units.py; no torch)."""
    from .config import QuantConfig
    from .passes.plan import plan_quantization
    from .passes.units import unit_report

    return unit_report(model, plan_quantization(model, QuantConfig()))


def format_summary(info: dict) -> str:
    lines = [f"opset {info['opset']}, IR {info['ir_version']}, {info['num_nodes']} nodes, "
             f"{info['num_parameters']:,} parameters ({info['parameter_bytes'] / 2**20:.1f} MiB)"]
    for key in ("inputs", "outputs"):
        lines.append(f"{key}:")
        for v in info[key]:
            lines.append(f"  {v['name']}: {v['dtype']} {v['shape']}")
    lines.append("ops: " + ", ".join(f"{k} {v}" for k, v in sorted(info["op_counts"].items(), key=lambda kv: -kv[1])))
    if info["parameters_by_dtype"]:
        lines.append("parameters by type: " + ", ".join(f"{k} {v:,}" for k, v in info["parameters_by_dtype"].items()))
    for k, v in info["metadata"].items():
        lines.append(f"  {k} = {v}")
    att = info.get("attention")
    if att is not None:
        roles = Counter(a["role"] for a in att)
        by_role = " (" + ", ".join(f"{r} {c}" for r, c in roles.items()) + ")" if att else ""
        lines.append(f"attention sites: {len(att)}{by_role}")
    units = info.get("units")
    if units:
        kinds = Counter(u["role"] for u in units)
        lines.append(f"reconstruction units: {len(units)} (" + ", ".join(f"{r} {c}" for r, c in kinds.items()) + ")")
    for rej in info.get("attention_rejected", []):
        lines.append(f"  Softmax {rej['softmax']} is not attention: {rej['reason']}")
    return "\n".join(lines)
