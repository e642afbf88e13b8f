"""`carsam-onnx split`: a full SAM graph (FP or Q/DQ) -> an encoder (image -> image_embeddings) and a decoder
(image_embeddings, point_coords, point_labels -> low_res_masks, iou_predictions, dynamic point count): the two
files edge applications deploy (encoder once per image, decoder per prompt).

eval's split (eval/split.py) cuts at the full set of image-only values the prompt side reads, which in a SAM
graph is the image embedding plus a few tensors derived from it. Here the cut is the image embedding alone:
the last value produced by an image-encoder node (node names keep the torch module path, `image_encoder`) of
shape [1, C, S/16, S/16] through which every path from the image to the prompt side runs. The decoder then
recomputes the few derived tensors itself, as the project's own `export --split` decoder does.
"""
from __future__ import annotations

import onnx

from ..errors import ModelError
from ..samgraph import (IMAGE_INPUT, PROMPT_INPUTS, find_boundary, node_inputs, nodes_needed, submodel,
                        value_infos)

EMBEDDING = "image_embeddings"
ENCODER_TAG = "image_encoder"


def _shape(v: onnx.ValueInfoProto) -> tuple:
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim)


def _node_tag(node: onnx.NodeProto) -> str:
    return node.name + " " + " ".join(p.value for p in node.metadata_props)


def find_embedding(model: onnx.ModelProto, image_size: int) -> str:
    """Name of the image-embedding value (see the module docstring); ModelError if there is none."""
    g = model.graph
    boundary = find_boundary(model)
    if not boundary or IMAGE_INPUT in boundary:
        raise ModelError("cannot split: the prompt part of the graph reads the image itself")
    nodes = list(g.node)
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        infos = {v.name: v for v in inferred.graph.value_info}
    except Exception:
        infos = {v.name: v for v in g.value_info}
    s = image_size // 16
    candidates = [o for n in nodes if ENCODER_TAG in _node_tag(n) for o in n.output
                  if o in infos and len(_shape(infos[o])) == 4 and _shape(infos[o])[0] == 1
                  and _shape(infos[o])[2:] == (s, s)]
    for v in reversed(candidates):          # the last cut wins: the embedding after the neck
        needed = nodes_needed(nodes, boundary, {v})
        if not any(IMAGE_INPUT in node_inputs(n) for n in needed) and v not in (IMAGE_INPUT,):
            return v
    raise ModelError(f"cannot find the image embedding (an {ENCODER_TAG} value [1, C, {s}, {s}] that every path "
                     "from the image to the prompts runs through); eval splits such models at its own boundary")


def _rename(model: onnx.ModelProto, old: str, new: str) -> None:
    g = model.graph
    for n in g.node:
        n.input[:] = [new if x == old else x for x in n.input]
        n.output[:] = [new if x == old else x for x in n.output]
    for v in list(g.input) + list(g.output) + list(g.value_info):
        if v.name == old:
            v.name = new


def _set_meta(model: onnx.ModelProto, key: str, value: str) -> None:
    for p in model.metadata_props:
        if p.key == key:
            p.value = value
            return
    model.metadata_props.add(key=key, value=value)


def split_at_embedding(model: onnx.ModelProto, image_size: int) -> tuple[onnx.ModelProto, onnx.ModelProto, str]:
    """(encoder, decoder, name of the cut value in the full graph)."""
    g = model.graph
    names = {i.name for i in g.input}
    if IMAGE_INPUT not in names or not set(PROMPT_INPUTS) <= names:
        raise ModelError(f"cannot split: a full SAM graph has inputs {IMAGE_INPUT}, {', '.join(PROMPT_INPUTS)}")
    if EMBEDDING in {v for n in g.node for v in n.output} | names:
        raise ModelError(f"cannot split: the graph already has a value named {EMBEDDING}")
    cut = find_embedding(model, image_size)
    info = value_infos(model, [cut])[cut]
    nodes = list(g.node)
    inputs = {i.name: i for i in g.input}
    encoder = submodel(model, nodes_needed(nodes, [cut], {IMAGE_INPUT}), [inputs[IMAGE_INPUT]], [info],
                        g.name + "_encoder")
    outputs = [o.name for o in g.output]
    dec_nodes = nodes_needed(nodes, outputs, {cut, *PROMPT_INPUTS})
    decoder = submodel(model, dec_nodes, [info] + [inputs[p] for p in PROMPT_INPUTS], list(g.output),
                        g.name + "_decoder")
    for part, m in (("encoder", encoder), ("decoder", decoder)):
        _rename(m, cut, EMBEDDING)
        _set_meta(m, "carsam.part", part)
        _set_meta(m, "carsam.image_size", str(image_size))
        onnx.checker.check_model(m)
    return encoder, decoder, cut
