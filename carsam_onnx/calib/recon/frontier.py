"""Captures that resume where the previous one stopped (`ReconConfig.stream_cut`).

Each unit's capture needs the quantized and the float model's values at its inputs, for every calibration image.
Run from the image, the capture of the k-th encoder unit repeats the k - 1 blocks before it: on vit_b, 24 encoder
units x 32 images x 2 models. Instead, each capture also keeps the frontier of what it computed: the values that
the nodes needed for the unit's inputs hand to the rest of the graph (the residual stream and the unit's input,
in an encoder). The next capture starts there and runs only the nodes after it.

A frontier is kept only where it cannot go stale: no node behind it reads a quantizer that can still change (an
activation site or a weight of a unit not finished yet), so later units' learning never changes what it holds.
Resuming computes the same operations on the same values as a run from the image, so the captured values are
identical.
"""
from __future__ import annotations

import onnx

from ...passes.units import GraphIndex


class Frontier:
    def __init__(self, model: onnx.ModelProto, image_input: str):
        """`model`: the graph the executor runs (with its quantization points)."""
        self.G = GraphIndex(model)
        self.image = image_input
        self.graph_outputs = [o.name for o in model.graph.output]
        self.cached: tuple[list[dict], list[dict]] | None = None   # (quantized, float) values per image
        self.behind: set[str] = set()    # the values computed behind the cached frontier

    def ancestors(self, values) -> set[int]:
        """Nodes whose outputs `values` depend on."""
        up: set[int] = set()
        stack = [self.G.producer[v] for v in values if v in self.G.producer]
        while stack:
            i = stack.pop()
            if i in up:
                continue
            up.add(i)
            stack.extend(self.G.producer[x] for x in self.G.nodes[i].input if x in self.G.producer)
        return up

    def serves(self, needed) -> bool:
        """Whether a run resumed at the cached frontier reaches every one of `needed`."""
        if self.cached is None:
            return False
        kept = self.cached[0][0].keys() if self.cached[0] else ()
        return all(v in kept or v not in self.behind for v in needed)

    def keep(self, needed, q: list[dict], fp: list[dict]) -> None:
        """Cache the frontier behind `needed` (its values per image, from the quantized and the float model)."""
        self.cached = (q, fp)
        self.behind = {o for i in self.ancestors(needed) for o in self.G.nodes[i].output if o}

    def drop(self) -> None:
        self.cached, self.behind = None, set()

    def values(self, needed, unsettled: set[str]) -> list[str] | None:
        """The frontier behind `needed` (a unit's input values), or None when a node behind it reads one of
        `unsettled` (quantization points and weights whose quantizers may still change), when nodes beyond it
        read the image, or when nothing lies behind."""
        up = self.ancestors(needed)
        if not up or any(x in unsettled for i in up for x in (*self.G.nodes[i].input, *self.G.nodes[i].output)):
            return None   # a weight read, or a quantization point's output written, behind it may still change
        if any(i not in up for i in self.G.consumers.get(self.image, [])):
            return None   # the image is still read beyond it (a prompt-side unit): a resumed run could not start
        produced = {o for i in up for o in self.G.nodes[i].output if o}
        cut = {x for i, n in enumerate(self.G.nodes) if i not in up for x in n.input
               if x in produced and x not in self.G.const}
        cut.update(o for o in self.graph_outputs if o in produced)
        return sorted(cut)
