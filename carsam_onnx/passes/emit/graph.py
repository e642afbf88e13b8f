"""Graph utilities of emission: rewiring consumers, dropping unread initializers, metadata, the final check."""
from __future__ import annotations

import json

import onnx

from ...errors import ModelError
from ...modelio import as_external_data_file

META_PREFIX = "carsam.quant."


def rewire(node: onnx.NodeProto, old: str, new: str) -> None:
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


def drop_unread(g: onnx.GraphProto, candidates: set[str]) -> None:
    unread = candidates - _read_names(g)
    if not unread:
        return
    keep = [t for t in g.initializer if t.name not in unread]
    del g.initializer[:]
    g.initializer.extend(keep)
    inputs = [v for v in g.input if v.name not in unread]
    del g.input[:]
    g.input.extend(inputs)


def set_metadata(model: onnx.ModelProto, info: dict[str, str]) -> None:
    keys = {META_PREFIX + k for k in info}
    keep = [p for p in model.metadata_props if p.key not in keys]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for k, v in sorted(info.items()):
        model.metadata_props.add(key=META_PREFIX + k, value=str(v))


# The ONNX Runtime session config entries under which a carsam Q/DQ model computes what its graph says (issue 9;
# runtime/ort_settings.py applies them, docs/quantization_format.md "ONNX Runtime notes" gives the facts). Defined
# here, below runtime/, because emission records them in each model's metadata under ORT_SESSION_CONFIG_KEY (JSON).
ORT_SESSION_CONFIG: dict[str, str] = {
    "session.qdq_matmulnbits_accuracy_level": "0",
    "optimization.disable_specified_optimizers": "WeightBiasQuantization;MatMulAddFusion",
}
ORT_SESSION_CONFIG_KEY = "carsam.ort_session_config"


def record_session_config(model: onnx.ModelProto) -> None:
    """Write ORT_SESSION_CONFIG as JSON under ORT_SESSION_CONFIG_KEY (replacing an earlier entry)."""
    keep = [p for p in model.metadata_props if p.key != ORT_SESSION_CONFIG_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    model.metadata_props.add(key=ORT_SESSION_CONFIG_KEY, value=json.dumps(ORT_SESSION_CONFIG, sort_keys=True))


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
        with as_external_data_file(model) as path:
            path = str(path)
            onnx.checker.check_model(path, full_check=True)
            onnx.shape_inference.infer_shapes_path(path, path, check_type=True, strict_mode=True)
            return onnx.load(path, load_external_data=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as e:
        first = (str(e).strip().splitlines() or ["no detail"])[0][:300]
        raise ModelError(f"emitted model fails the ONNX checker: {first}") from None
