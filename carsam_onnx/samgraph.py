"""What SAM graph is this, and how it splits at the image embedding.

Recognition (`inspect_sam_model`) goes by the graph inputs: image, point_coords, point_labels (full model),
image (encoder), image_embeddings, point_coords, point_labels (decoder), or segment-anything's own decoder
export (extra inputs mask_input, has_mask_input, orig_im_size). The image size comes from a static image
input or the carsam.image_size metadata.

Splitting (`split_full_model`): a full SAM graph (image + prompts -> masks) becomes an image part and a prompt
part, so that the image encoder runs once per image and only the prompt part runs per box.

The rule (exact for any graph, float or Q/DQ): a value is *image-only* when it depends on the `image` input and
on no prompt input. The boundary is the set of image-only values that a prompt-dependent node consumes, or that
are graph outputs. The image part computes the boundary from `image`; the prompt part computes the outputs from
the boundary and the prompt inputs. Every node lands on exactly one side, except prompt- and image-free constant
subgraphs, which go to each side that needs them. In a SAM graph the boundary is the image embedding
[1, 256, S/16, S/16] plus the few image-only tensors the mask decoder derives from it before it meets the prompt
tokens (the embedding plus the dense no-mask embedding, its flattened form, the first cross-attention's key
and value projections...).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import helper

from .errors import ModelError

META_IMAGE_SIZE = "carsam.image_size"
OFFICIAL_EXTRA = ("mask_input", "has_mask_input", "orig_im_size")
IMAGE_INPUT = "image"
PROMPT_INPUTS = ("point_coords", "point_labels")


# ---- what kind of SAM graph is this? ----------------------------------------------------------------------
@dataclass(frozen=True)
class SamModelInfo:
    kind: str                  # full | encoder | decoder | official_decoder
    image_size: int | None     # S; None when the graph does not tell (decoder without metadata)
    path: Path | None


def _dims(v: onnx.ValueInfoProto) -> list:
    t = v.type.tensor_type
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim] \
        if t.HasField("shape") else None


def _check_rank(v, rank: int, last: int | None, path) -> list:
    dims = _dims(v)
    if dims is not None and (len(dims) != rank or (last is not None and dims[-1] not in (last, None))
                             or (isinstance(dims[-1], str) and last is not None)):
        raise ModelError(f"{path}: input {v.name} has shape {dims}; a SAM graph expects rank {rank}"
                         + (f" with last dimension {last}" if last else ""))
    return dims or []


def inspect_sam_model(model: onnx.ModelProto, path: Path | None = None) -> SamModelInfo:
    """Recognise a SAM graph by its inputs; ModelError (one line) for anything else."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    inputs = {i.name: i for i in g.input if i.name not in inits}
    outputs = {o.name for o in g.output}
    names = set(inputs)
    where = path or "model"
    meta = {p.key: p.value for p in model.metadata_props}
    size = int(meta[META_IMAGE_SIZE]) if meta.get(META_IMAGE_SIZE, "").isdigit() else None
    if names == {"image"}:
        kind = "encoder"
    elif names == {"image", "point_coords", "point_labels"}:
        kind = "full"
    elif names == {"image_embeddings", "point_coords", "point_labels"}:
        kind = "decoder"
    elif names == {"image_embeddings", "point_coords", "point_labels", *OFFICIAL_EXTRA}:
        kind = "official_decoder"
    else:
        raise ModelError(f"{where} is not a SAM graph: inputs {sorted(names)}; expected image, point_coords, "
                         "point_labels (full), image (encoder) or image_embeddings, point_coords, point_labels (decoder)")
    if "image" in inputs:
        d = _check_rank(inputs["image"], 4, None, where)
        if len(d) == 4 and d[1] not in (3, None):
            raise ModelError(f"{where}: input image has {d[1]} channels; SAM takes 3")
        if len(d) == 4 and isinstance(d[2], int) and d[2] == d[3] and d[2] > 0:
            size = d[2]
    if "image_embeddings" in inputs:
        d = _check_rank(inputs["image_embeddings"], 4, None, where)
        if size is None and len(d) == 4 and isinstance(d[2], int) and d[2] > 0:
            size = d[2] * 16
    if "point_coords" in inputs:
        _check_rank(inputs["point_coords"], 3, 2, where)
        _check_rank(inputs["point_labels"], 2, None, where)
        need = {"low_res_masks", "iou_predictions"}
        if not need <= outputs:
            raise ModelError(f"{where}: outputs {sorted(outputs)} lack {', '.join(sorted(need - outputs))}; "
                             "export with carsam-onnx export")
    elif len(g.output) != 1:
        raise ModelError(f"{where}: an image encoder must have one output (the image embedding), found {len(g.output)}")
    return SamModelInfo(kind, size, path)


def sam_image_size(info: SamModelInfo) -> int:
    """The model's input image size; ModelError when the graph does not tell."""
    if info.image_size is None:
        raise ModelError(f"{info.path or 'model'}: cannot tell the input image size (no static image shape and no "
                         f"{META_IMAGE_SIZE} metadata)")
    return info.image_size


# ---- splitting at the image embedding ------------------------------------------------------------------
def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Outer-scope names that a node's subgraphs (If/Loop/Scan bodies) read."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
        for g in graphs:
            produced = {i.name for i in g.input} | {t.name for t in g.initializer}
            for n in g.node:
                produced.update(n.output)
            for n in g.node:
                names.update(x for x in list(n.input) + sorted(_subgraph_inputs(n)) if x and x not in produced)
    return names


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """The values a node reads: its inputs and those its subgraphs (If, Loop) read from outside."""
    return [x for x in node.input if x] + sorted(_subgraph_inputs(node))


def find_boundary(model: onnx.ModelProto, image: str = IMAGE_INPUT, prompts=PROMPT_INPUTS) -> list[str]:
    """Names of the image-only values the prompt side needs (see the module docstring), in graph order."""
    g = model.graph
    img, pts = {image}, set(prompts)
    consumers_pts: set[str] = set()
    for node in g.node:
        ins = node_inputs(node)
        dep_img = any(x in img for x in ins)
        dep_pts = any(x in pts for x in ins)
        if dep_pts:
            pts.update(node.output)
            consumers_pts.update(x for x in ins if x in img and x not in pts)
        elif dep_img:
            img.update(node.output)
    outputs = {o.name for o in g.output}
    order = [v for node in g.node for v in node.output]
    boundary = [v for v in order if v in img and v not in pts and (v in consumers_pts or v in outputs)]
    if image in consumers_pts or image in outputs:
        boundary.insert(0, image)
    return boundary


def nodes_needed(nodes: list[onnx.NodeProto], targets: list[str], stop: set[str]) -> list[onnx.NodeProto]:
    """Nodes needed to compute `targets`, not looking past `stop` values; in graph order."""
    producer = {}
    for i, node in enumerate(nodes):
        for o in node.output:
            producer[o] = i
    needed: set[int] = set()
    todo = [t for t in targets if t not in stop]
    seen = set(todo)
    while todo:
        v = todo.pop()
        i = producer.get(v)
        if i is None or i in needed:
            continue
        needed.add(i)
        for x in node_inputs(nodes[i]):
            if x not in stop and x not in seen:
                seen.add(x)
                todo.append(x)
    return [nodes[i] for i in sorted(needed)]


def value_infos(model: onnx.ModelProto, names: list[str]) -> dict[str, onnx.ValueInfoProto]:
    """The type and shape of each named value (ModelError for one the model does not type)."""
    g = model.graph
    known = {v.name: v for v in list(g.value_info) + list(g.output) + list(g.input)}
    missing = [n for n in names if n not in known or not known[n].type.HasField("tensor_type")]
    if missing:
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except Exception as e:  # >2 GB protos, unknown ops...
            raise ModelError(f"cannot infer the types of the values where the image and prompt parts meet "
                             f"({missing[0]}...): {type(e).__name__}") from None
        known.update({v.name: v for v in inferred.graph.value_info})
        missing = [n for n in names if n not in known]
        if missing:
            raise ModelError(f"no type known for {missing[0]}, where the image and prompt parts of the graph meet")
    return {n: known[n] for n in names}


def submodel(model: onnx.ModelProto, nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
             outputs: list[onnx.ValueInfoProto], name: str) -> onnx.ModelProto:
    """A model of `nodes` with the given inputs and outputs, the initializers they read, and `model`'s opsets."""
    used: set[str] = set()
    for n in nodes:
        used.update(node_inputs(n))
    produced = {o for n in nodes for o in n.output} | {i.name for i in inputs}
    inits = [t for t in model.graph.initializer if t.name in used and t.name not in produced]
    sparse = [t for t in model.graph.sparse_initializer if t.values.name in used]
    vinfo = [v for v in model.graph.value_info if v.name in produced]
    graph = helper.make_graph(nodes, name, list(inputs), list(outputs), initializer=inits,
                              value_info=vinfo, sparse_initializer=sparse)
    sub = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version,
                            producer_name=model.producer_name, producer_version=model.producer_version)
    sub.functions.extend(model.functions)
    sub.metadata_props.extend(model.metadata_props)
    return sub


def split_full_model(model: onnx.ModelProto, image: str = IMAGE_INPUT,
                     prompts=PROMPT_INPUTS) -> tuple[onnx.ModelProto, onnx.ModelProto, list[str]]:
    """(image part: image -> boundary, prompt part: boundary + prompts -> outputs, boundary names)."""
    g = model.graph
    in_names = {i.name for i in g.input}
    if image not in in_names or not set(prompts) <= in_names:
        raise ModelError(f"cannot split: the graph needs inputs {image}, {', '.join(prompts)}")
    boundary = find_boundary(model, image, prompts)
    if not boundary:
        raise ModelError("cannot split: no value of the graph depends on the image alone and feeds the prompt part")
    nodes = list(g.node)
    infos = value_infos(model, boundary)
    stop = set(boundary) | set(prompts) | {image}
    enc_nodes = nodes_needed(nodes, boundary, {image})
    dec_nodes = nodes_needed(nodes, [o.name for o in g.output if o.name not in boundary], stop)
    leaked = {x for n in dec_nodes for x in node_inputs(n)} & ({image} - set(boundary))
    if leaked:
        raise ModelError("cannot split: the prompt part still reads the image input")
    graph_inputs = {i.name: i for i in g.input}
    encoder = submodel(model, enc_nodes, [graph_inputs[image]], [infos[b] for b in boundary], g.name + "_image")
    dec_inputs = [infos[b] if b != image else graph_inputs[image] for b in boundary] + [graph_inputs[p] for p in prompts]
    decoder = submodel(model, dec_nodes, dec_inputs, list(g.output), g.name + "_prompt")
    return encoder, decoder, boundary


def no_mask_inputs(image_size: int, original_hw: tuple[int, int] | None = None) -> dict:
    """segment-anything's decoder export's extra inputs (OFFICIAL_EXTRA) for a prompt without a mask (SAM's ONNX
    convention): mask_input zeros, has_mask_input 0, orig_im_size the original image (default S x S)."""
    import numpy as np

    s = image_size // 4
    hw = original_hw if original_hw is not None else (image_size, image_size)
    return {"mask_input": np.zeros((1, 1, s, s), np.float32), "has_mask_input": np.zeros((1,), np.float32),
            "orig_im_size": np.asarray(hw, np.float32)}
