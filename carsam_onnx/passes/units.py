"""Reconstruction units from the graph's structure: the plan's attention sites and weight layers, never node names.

A unit is a sub-range of the graph that block reconstruction learns as one piece (issue 11):
- attention: from the values entering its q/k/v projections (one fused qkv layer in the encoder) to the output
  of its output projection, bias included (the value before the residual add);
- mlp: two linear weight layers joined only by elementwise ops on the first one's output (bias, GELU / ReLU);
  from the first layer's input to the second layer's output, bias included;
- neck: the same for a chain of convolutions (the encoder neck: Conv -> LayerNorm2d -> Conv); its output is
  the last convolution's output;
- layer: any quantized weight layer left over, alone.

Roles: an attention unit takes its site's role (encoder_window, decoder_token_to_image, ...); an mlp unit is
encoder_mlp or decoder_mlp after the attention site that precedes it in graph order (its block is that site's
block); a conv chain is the neck. Units are ordered by their output's position in the graph, so every unit's
inputs are computed by earlier units (or by float parts of the graph).

Pure data, no torch: `inspect --json` lists the units of a model.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import onnx

from .sites import QuantPlan, WeightKind

_MAX_CHAIN = 24   # nodes crossed between two weight layers of one mlp / neck (LayerNorm2d decomposed: ~10)


@dataclass(frozen=True)
class Unit:
    kind: str                         # attention | mlp | neck | layer
    role: str                         # attention role, encoder_mlp / decoder_mlp, neck, layer
    block: int | None                 # encoder block / decoder layer (None: final attention, neck)
    inputs: tuple[str, ...]           # activation values the unit starts from (QDrop mixes these)
    extra_inputs: tuple[str, ...]     # other non-constant values its nodes read (shape values, ...)
    output: str                       # the value reconstructed (before the residual add)
    channel_axis: int                 # channel axis of `output` (the loss sums squared errors over it)
    weights: tuple[str, ...]          # weight initializers of its quantized layers
    activations: tuple[str, ...]      # activation-site values with a quantized consumer inside the unit
    nodes: int                        # number of graph nodes in the unit
    targets: tuple[tuple[str, int], ...] = ()   # joint units: (output, channel axis) of each member; the loss sums them
    members: tuple[str, ...] = ()               # joint units: names of the units it joins

    @property
    def name(self) -> str:
        return self.role if self.block is None else f"{self.role}[{self.block}]"

    @property
    def in_decoder(self) -> bool:
        """A mask-decoder unit (decoder attention, MLP, final attention, JCAR's joint units): not the image
        encoder's blocks, not the neck."""
        return not (self.role.startswith("encoder") or self.role == "neck")

    @property
    def losses(self) -> tuple[tuple[str, int], ...]:
        """(value, channel axis) pairs whose squared error against the FP model the unit minimises."""
        return self.targets or ((self.output, self.channel_axis),)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["name"] = self.name
        return d


class GraphIndex:
    """A model's nodes with their producers, consumers and constant values (initializers and what is computed
    from them alone), for the structural rules of this module, image_cut.py and recon's frontier."""

    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.nodes = list(g.node)
        self.index = {n.name: i for i, n in enumerate(self.nodes) if n.name}
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}
        for i, n in enumerate(self.nodes):
            for o in n.output:
                if o:
                    self.producer[o] = i
            for x in n.input:
                if x:
                    self.consumers.setdefault(x, []).append(i)
        self.const: set[str] = {t.name for t in g.initializer}
        for n in self.nodes:   # values computed from constants only (topological order)
            if all(x in self.const for x in n.input if x):
                self.const.update(o for o in n.output if o)

    def with_bias(self, value: str) -> str:
        """`value`, or the output of the bias Add right after it (its only consumer, other operand constant)."""
        cons = self.consumers.get(value, [])
        if len(cons) == 1:
            n = self.nodes[cons[0]]
            if n.op_type == "Add" and len(n.input) == 2 and any(x in self.const for x in n.input if x != value):
                return n.output[0]
        return value

    def between(self, inputs: tuple[str, ...], output: str) -> set[int]:
        """Nodes on a path from one of `inputs` to `output`."""
        down: set[int] = set()
        stack = [c for v in inputs for c in self.consumers.get(v, [])]
        while stack:
            i = stack.pop()
            if i in down:
                continue
            down.add(i)
            for o in self.nodes[i].output:
                stack.extend(self.consumers.get(o, []))
        up: set[int] = set()
        stack = [output]
        seen: set[str] = set()
        while stack:
            v = stack.pop()
            if v in seen or v in inputs or v in self.const:
                continue
            seen.add(v)
            i = self.producer.get(v)
            if i is None or i not in down or i in up:
                continue
            up.add(i)
            stack.extend(x for x in self.nodes[i].input if x)
        return up

    def initializers_behind(self, nodes: set[int]) -> set[str]:
        """Initializers that `nodes` read directly or through constant-only nodes (position tables)."""
        found: set[str] = set()
        stack = [x for i in nodes for x in self.nodes[i].input if x in self.const]
        seen: set[str] = set()
        while stack:
            v = stack.pop()
            if v in seen:
                continue
            seen.add(v)
            i = self.producer.get(v)
            if i is None:
                found.add(v)
            else:
                stack.extend(x for x in self.nodes[i].input if x)
        return found

    def chain_source(self, value: str, layer_nodes: set[int]) -> int | None:
        """The one weight-layer node that `value` is computed from through non-layer nodes (reading only it and
        constants), within _MAX_CHAIN nodes; None if there is none or more than one source."""
        sources: set[int] = set()
        stack, seen, crossed = [value], set(), 0
        while stack:
            v = stack.pop()
            if v in seen or v in self.const:
                continue
            seen.add(v)
            i = self.producer.get(v)
            if i is None:
                return None
            if i in layer_nodes:
                sources.add(i)
                continue
            crossed += 1
            if crossed > _MAX_CHAIN:
                return None
            stack.extend(x for x in self.nodes[i].input if x)
        return sources.pop() if len(sources) == 1 else None


def find_units(model: onnx.ModelProto, plan: QuantPlan) -> list[Unit]:
    """The reconstruction units of `model` under `plan` (see the module docstring), in graph order."""
    G = GraphIndex(model)
    layers = {G.index[w.node]: w for w in plan.weights if w.kind is not WeightKind.CONSTANT and w.node in G.index}
    acts_by_node: dict[int, list[str]] = {}
    for a in plan.activations:
        for c in a.consumers:
            if c in G.index:
                acts_by_node.setdefault(G.index[c], []).append(a.value)
    const_sites = {w.initializer for w in plan.weights if w.kind is WeightKind.CONSTANT}

    def make(kind, role, block, inputs, output, axis, owned_layers=()) -> tuple[Unit, set[int]]:
        inputs = tuple(dict.fromkeys(inputs))
        nodes = G.between(inputs, output)
        produced = {o for i in nodes for o in G.nodes[i].output if o}
        extra = sorted({x for i in nodes for x in G.nodes[i].input
                        if x and x not in produced and x not in G.const and x not in inputs})
        weights = [layers[i].initializer for i in sorted(nodes) if i in layers]
        weights += sorted(G.initializers_behind(nodes) & const_sites)
        acts = list(dict.fromkeys(v for i in sorted(nodes) for v in acts_by_node.get(i, ())))
        return Unit(kind, role, block, inputs, tuple(extra), output, axis, tuple(weights), tuple(acts),
                    len(nodes)), nodes

    units: list[tuple[int, Unit]] = []
    taken: set[int] = set()
    attn_ends: list[tuple[int, str, int | None]] = []   # (out_proj index, role, block)
    for s in plan.attention:
        projs = [G.index[p] for p in (s.q_proj, s.k_proj, s.v_proj)]
        out_i = G.index[s.out_proj]
        output = G.with_bias(G.nodes[out_i].output[0])
        u, nodes = make("attention", s.role.value, s.block, tuple(G.nodes[i].input[0] for i in projs), output, -1)
        units.append((G.producer[output], u))
        taken |= nodes & set(layers)
        attn_ends.append((out_i, s.role.value, s.block))
    attn_ends.sort()

    layer_set = set(layers)
    free = sorted(i for i in layers if i not in taken)
    follows: dict[int, int] = {}            # second layer -> first layer of a two-layer chain
    for b in free:
        a = G.chain_source(G.nodes[b].input[0], layer_set)
        if a is not None and a in free and layers[a].kind == layers[b].kind and a not in follows.values():
            follows[b] = a
    firsts = set(follows.values())
    chains: list[list[int]] = []
    for i in free:                          # maximal chains a -> b -> c ... in graph order
        if i in follows:
            continue
        chain = [i]
        nxt = {a: b for b, a in follows.items()}
        while chain[-1] in nxt:
            chain.append(nxt[chain[-1]])
        chains.append(chain)
    for chain in chains:
        first, last = G.nodes[chain[0]], G.nodes[chain[-1]]
        kind_w = layers[chain[0]].kind
        conv = kind_w in (WeightKind.CONV, WeightKind.CONV_TRANSPOSE)
        output = last.output[0] if conv else G.with_bias(last.output[0])
        before = [e for e in attn_ends if e[0] < chain[0]]
        if len(chain) == 1 and chain[0] not in firsts:
            kind, role, block = "layer", "layer", None
        elif conv:
            kind, role, block = "neck", "neck", None
        else:
            part = before[-1][1].split("_")[0] if before else "encoder"
            kind, role, block = "mlp", f"{part}_mlp", (before[-1][2] if before else None)
        u, _ = make(kind, role, block, (first.input[0],), output, 1 if conv else -1)
        units.append((G.producer[output], u))
    units.sort(key=lambda t: t[0])
    return [u for _, u in units]


JOINT_ROLES = {   # JCAR pairing -> the roles of one two-way decoder layer that learn as one unit (graph order)
    "attn": ("decoder_token_to_image", "decoder_image_to_token"),
    "mlp": ("decoder_token_to_image", "decoder_mlp", "decoder_image_to_token"),
    "layer": ("decoder_self", "decoder_token_to_image", "decoder_mlp", "decoder_image_to_token"),
}


def joint_units(model: onnx.ModelProto, units: list[Unit], pairing: str) -> list[Unit]:
    """JCAR: per two-way decoder layer, the units of JOINT_ROLES[pairing] replaced by one joint unit that learns
    their weights and activation step sizes together against the sum of their outputs' errors (the token stream
    and the image stream). The joint unit starts from the first member's inputs plus whatever later members
    read from outside (the image keys and their positional encodings); a unit between two members that is not
    one of them (the MLP for pairing "attn") runs inside the joint unit and is reconstructed on its own just
    before it. Layers that lack one of the roles are left as they are."""
    roles = JOINT_ROLES[pairing]
    G = GraphIndex(model)
    by_block: dict[int, dict[str, Unit]] = {}
    for u in units:
        if u.block is not None and u.role in roles:
            by_block.setdefault(u.block, {})[u.role] = u
    joined: dict[str, Unit] = {}     # name of the last member -> joint unit
    absorbed: set[str] = set()
    for block, found in sorted(by_block.items()):
        if set(found) == set(roles):
            members = [found[r] for r in roles]
            joined[members[-1].name] = join_units(model, members, f"decoder_joint_{pairing}", block, G)
            absorbed.update(m.name for m in members)
    out = []
    for u in units:
        if u.name in joined:
            out.append(joined[u.name])
        elif u.name not in absorbed:
            out.append(u)
    return out


def join_units(model: onnx.ModelProto, members: list[Unit], role: str, block: int | None,
               G: GraphIndex | None = None) -> Unit:
    """One unit that learns `members` (in graph order) together: it starts from the first member's inputs plus
    what later members read from outside it, runs every node on the way to each member's output, learns all
    their weights and activations, and its loss sums the members' output errors."""
    G = G or GraphIndex(model)
    inputs: list[str] = list(members[0].inputs)
    for m in members[1:]:
        inputs += [x for x in m.inputs if x not in inputs and not G.between(tuple(inputs), x)]
    inputs_t = tuple(inputs)
    nodes: set[int] = set()
    for m in members:
        nodes |= G.between(inputs_t, m.output)
    produced = {o for i in nodes for o in G.nodes[i].output if o}
    extra = sorted({x for i in nodes for x in G.nodes[i].input
                    if x and x not in produced and x not in G.const and x not in inputs_t})
    return Unit("joint", role, block, inputs_t, tuple(extra), members[-1].output, members[-1].channel_axis,
                tuple(w for m in members for w in m.weights),
                tuple(dict.fromkeys(a for m in members for a in m.activations)), len(nodes),
                targets=tuple((m.output, m.channel_axis) for m in members), members=tuple(m.name for m in members))


def unit_report(model: onnx.ModelProto, plan: QuantPlan) -> list[dict]:
    """JSON-ready units (the `units` key of `inspect --json`)."""
    return [u.to_dict() for u in find_units(model, plan)]
