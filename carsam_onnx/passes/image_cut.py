"""Where reconstruction's prompt-side units may start: the values at which a full model's image-only part
(encoder, neck) meets its prompt part.

Once every unit inside the image-only part is finished, those values are fixed for each calibration image, so
the decoder's units capture their inputs from them instead of running the encoder again for every unit
(calib/recon/loop.py caches them). A rule over the graph, not over node names: a node is image-only when it
reads the image (or a value made from it) and no prompt input.
"""
from __future__ import annotations

import onnx

from ..samgraph import IMAGE_INPUT, PROMPT_INPUTS
from .units import Unit, GraphIndex


def image_cut_plan(model: onnx.ModelProto, units: list[Unit]) -> tuple[list[str], set[str]] | None:
    """(cut values, names of the prompt-side units that may start there), or None: the model lacks the image
    input or the prompt inputs, no unit reaches the prompt side, or an image-only unit comes after a prompt-side
    one (the cut would be made before that unit is finished)."""
    inputs = {i.name for i in model.graph.input}
    if IMAGE_INPUT not in inputs or not inputs & set(PROMPT_INPUTS):
        return None
    G = GraphIndex(model)
    prompt: set[str] = set(PROMPT_INPUTS) & inputs
    image: set[str] = {IMAGE_INPUT}
    image_nodes: set[int] = set()
    for i, n in enumerate(G.nodes):
        ins = [x for x in n.input if x]
        if any(x in prompt for x in ins):
            prompt.update(o for o in n.output if o)
        elif any(x in image for x in ins):
            image.update(o for o in n.output if o)
            image_nodes.add(i)
    unit_nodes = [set().union(*(G.between(u.inputs, v) for v, _ in u.losses)) for u in units]
    prompt_side = [bool(nodes - image_nodes) for nodes in unit_nodes]
    if not any(prompt_side):
        return None
    first = prompt_side.index(True)
    if any(not p for p in prompt_side[first:]):
        return None
    region = image_nodes - set().union(*(n for n, p in zip(unit_nodes, prompt_side) if p))
    produced = {o for i in region for o in G.nodes[i].output if o}
    cut = sorted({x for i, n in enumerate(G.nodes) if i not in region for x in n.input
                  if x in produced and x not in G.const})
    cut += [o.name for o in model.graph.output if o.name in produced and o.name not in cut]
    return cut, {u.name for u, p in zip(units, prompt_side) if p}
