"""torch SAM -> ONNX at opset 21 (dynamo exporter by default, TorchScript exporter on request)."""
from __future__ import annotations

import re
import warnings
from collections import Counter

import onnx
import torch

from .models import BuiltSam
from .wrappers import FullSam, ImageEncoder, PromptedMaskDecoder

OPSET = 21
EXPORTERS = ("dynamo", "torchscript")
TORCHSCRIPT_OPSET = 17  # what torch's TorchScript exporter emits well; upgraded to OPSET afterwards
META_PREFIX = "carsam."


def example_inputs(part: str, image_size: int, embed_dim: int = 256) -> dict[str, torch.Tensor]:
    grid = image_size // 16
    coords = torch.tensor([[[0.2, 0.3], [0.7, 0.8]]]) * image_size
    labels = torch.tensor([[2.0, 3.0]])
    if part == "encoder":
        return {"image": torch.randn(1, 3, image_size, image_size)}
    if part == "decoder":
        return {"image_embeddings": torch.randn(1, embed_dim, grid, grid), "point_coords": coords, "point_labels": labels}
    return {"image": torch.randn(1, 3, image_size, image_size), "point_coords": coords, "point_labels": labels}


OUTPUTS = {"encoder": ["image_embeddings"], "decoder": ["low_res_masks", "iou_predictions"],
           "full": ["low_res_masks", "iou_predictions"]}


def module_for(built: BuiltSam, part: str, multimask: bool) -> torch.nn.Module:
    if part == "encoder":
        return ImageEncoder(built.sam).eval()
    if part == "decoder":
        return PromptedMaskDecoder(built.sam, multimask).eval()
    return FullSam(built.sam, multimask).eval()


def _export_dynamo(module, inputs: dict, outputs: list[str]) -> onnx.ModelProto:
    num_points = torch.export.Dim("num_points", min=1, max=256)
    dyn = {k: ({1: num_points} if k.startswith("point_") else None) for k in inputs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(module, tuple(inputs.values()), dynamo=True, opset_version=OPSET,
                                 input_names=list(inputs), output_names=outputs, dynamic_shapes=dyn,
                                 optimize=True, verbose=False)
    return prog.model_proto


def _export_torchscript(module, inputs: dict, outputs: list[str]) -> onnx.ModelProto:
    import io

    buf = io.BytesIO()
    dyn = {k: {1: "num_points"} for k in inputs if k.startswith("point_")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(inputs.values()), buf, dynamo=False, opset_version=TORCHSCRIPT_OPSET,
                          input_names=list(inputs), output_names=outputs, dynamic_axes=dyn, do_constant_folding=True)
    model = onnx.load_from_string(buf.getvalue())
    return onnx.version_converter.convert_version(model, OPSET)


_DROP_META = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node")


def name_nodes_by_module(model: onnx.ModelProto) -> None:
    """Give dynamo's nodes ("node_MatMul_12") TorchScript-style names from their module path:
    "/image_encoder/blocks.0/attn/qkv/MatMul". Names stay unique; metadata keeps the rest."""
    used = Counter()
    for node in model.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        scopes = meta.get("pkg.torch.onnx.name_scopes")
        keep = [p for p in node.metadata_props if p.key not in _DROP_META]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)
        if not scopes:
            continue
        scopes = [s for s in re.findall(r"'([^']*)'", scopes)[:-1] if s]  # last entry is the aten op
        base = f"/{scopes[-1]}/{node.op_type}" if scopes else f"/{node.op_type}"  # scopes[-1]: full module path
        used[base] += 1
        node.name = base if used[base] == 1 else f"{base}_{used[base] - 1}"


def export_onnx(built: BuiltSam, part: str = "full", exporter: str = "dynamo", multimask: bool = False) -> onnx.ModelProto:
    image_size = built.sam.image_encoder.img_size
    inputs = example_inputs(part, image_size, built.sam.prompt_encoder.embed_dim)
    module = module_for(built, part, multimask)
    outputs = OUTPUTS[part]
    if exporter == "dynamo":
        model = _export_dynamo(module, inputs, outputs)
        name_nodes_by_module(model)
    else:
        model = _export_torchscript(module, inputs, outputs)
    meta = {"model_type": built.model_type, "image_size": str(image_size), "part": part, "exporter": exporter,
            "multimask": str(multimask).lower(), **built.provenance}
    set_metadata(model, meta)
    model.producer_name = "carsam-onnx"
    return model


def set_metadata(model: onnx.ModelProto, meta: dict[str, str]) -> None:
    keep = [p for p in model.metadata_props if not p.key.startswith(META_PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for k, v in meta.items():
        model.metadata_props.add(key=META_PREFIX + k, value=str(v))


def get_metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key[len(META_PREFIX):]: p.value for p in model.metadata_props if p.key.startswith(META_PREFIX)}
