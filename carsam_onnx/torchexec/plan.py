"""Plans of the torch executor (module.py): for one request (device, given tensors, wanted values, replaced
values), the nodes to run, in order, with the slots their values live in, when each slot is freed, and which
values are static.

Static values depend only on constants and on the plan's tensor shapes (Shape -> Gather -> Concat -> Reshape
chains of TorchScript exports): the plan's first run (the warm-up) computes them, `finish_warmup` keeps them in
a template, and later runs skip their nodes. Integer initializers (buffers) count as constants; a plan records
their in-place version so that the module rebuilds it when one changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from ..errors import InputError
from .ops import OpSpec


@dataclass
class Node:
    index: int
    name: str
    op_type: str
    inputs: tuple[str, ...]   # "" for an omitted optional input
    outputs: tuple[str, ...]
    spec: OpSpec
    fn: Callable


@dataclass(frozen=True)
class GraphView:
    """What planning reads of a module's graph (the module's own dicts, filled as it is built)."""
    nodes: list[Node]                 # topological order
    producer: dict[str, Node]         # value -> the node computing it
    attr_of: dict[str, str]           # initializer name -> the module attribute holding it
    consts: dict[str, torch.Tensor]   # values folded from Constant nodes (on the CPU)
    input_names: list[str]


@dataclass
class Plan:
    nslots: int
    steps: list                 # warm-up steps: every needed node
    fast_nodes: list            # the needed nodes that are not static
    steps_for: Callable         # node list -> steps
    leaves: list                # (slot, kind, key): ("param"|"buffer", attr), ("input", name), ("fixed", tensor)
    record: dict                # slot of a static value -> its host-copy slot (-1: none), filled from the warm-up run
    hooked: dict[str, int]      # replaced leaf value -> slot
    outputs: list[tuple[str, int]]
    fast_steps: list | None = None   # after warm-up: the non-static nodes only
    template: list | None = None     # slot values prefilled for fast runs
    recorded: dict | None = None
    buffers: tuple = ()              # (attr, tensor, version) of the buffers treated as constants


def make_plan(g: GraphView, params: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor],
              consts: Mapping[str, torch.Tensor], given: set[str], wanted: list[str], hooked: set[str]) -> Plan:
    """The plan of one request: the nodes `wanted` needs, backwards from it and stopping at `given`; which of
    their values are static; slots, frees and per-run leaves. `params` / `buffers`: the module's, by attribute;
    `consts`: the folded constants on the request's device."""
    # Nodes needed, backwards from the wanted values.
    needed: set[int] = set()
    leaves: set[str] = set()
    stack = list(wanted)
    seen: set[str] = set()
    while stack:
        v = stack.pop()
        if v in seen or not v:
            continue
        seen.add(v)
        if v in given or v in g.attr_of or (v in g.consts and v not in hooked):
            leaves.add(v)
            continue
        node = g.producer.get(v)
        if node is None:
            if v in g.input_names:
                raise InputError(f"graph input {v!r} is needed for {wanted[0]!r} but was not given")
            raise InputError(f"value {v!r} is not computable: it is no graph input, initializer or node output")
        if node.index in needed:
            continue
        needed.add(node.index)
        stack.extend(node.inputs)
    nodes = [g.nodes[i] for i in sorted(needed)]

    # Static analysis: value-static (constant given the plan's shapes) and shape-static values.
    value_static: set[str] = set()
    shape_static: set[str] = set(leaves)
    for v in leaves:
        if v in given or v in hooked:
            continue
        if v in g.consts or (v in g.attr_of and g.attr_of[v] not in params):
            value_static.add(v)
    static_nodes: set[int] = set()
    for n in nodes:
        ins = [x for x in n.inputs if x]
        data = [x for j, x in enumerate(n.inputs) if x and j not in n.spec.host_inputs]
        host = [x for j, x in enumerate(n.inputs) if x and j in n.spec.host_inputs]
        shp = not n.spec.data_dependent_shape and all(x in shape_static for x in data) and \
            all(x in value_static for x in host)
        if n.spec.shape_only:
            stat = all(x in shape_static for x in ins)
        else:
            stat = all(x in value_static for x in ins)
        stat = stat and not any(o in hooked or o in given for o in n.outputs)
        for o in n.outputs:
            if o and o not in given:
                if shp or stat:
                    shape_static.add(o)
                if stat:
                    value_static.add(o)
        if stat:
            static_nodes.add(n.index)

    # Slots.
    slots: dict[str, int] = {}

    def slot(v: str) -> int:
        if v not in slots:
            slots[v] = len(slots)
        return slots[v]
    for v in sorted(leaves):
        slot(v)
    for n in nodes:
        for o in n.outputs:
            if o:
                slot(o)
    host_slot: dict[str, int] = {}
    fast_nodes = [n for n in nodes if n.index not in static_nodes]
    for n in fast_nodes:
        for j, x in enumerate(n.inputs):
            if x in value_static and j in n.spec.host_inputs and x not in host_slot:
                host_slot[x] = len(slots) + len(host_slot)
    nslots = len(slots) + len(host_slot)
    keep = {slots[w] for w in wanted}

    def steps_for(node_list, use_host):
        last: dict[int, int] = {}
        for k, n in enumerate(node_list):
            for x in n.inputs:
                if x:
                    last[slots[x]] = k
        out = []
        for k, n in enumerate(node_list):
            ins = tuple(-1 if not x else (host_slot[x] if use_host and j in n.spec.host_inputs and x in host_slot
                                            else slots[x]) for j, x in enumerate(n.inputs))
            outs = tuple(slots[o] if o and o not in given else -1 for o in n.outputs)
            frees = tuple(s for s, kk in last.items() if kk == k and s not in keep and s not in outs)
            hk = tuple((slots[o], o) for o in n.outputs if o in hooked)
            out.append((n.fn, ins, outs[0] if len(outs) == 1 else outs, frees, hk, n))
        return out

    # Per-run leaves: given tensors, parameters (and hooked constants/buffers).
    run_leaves = []
    fixed: dict[str, torch.Tensor] = {}
    for v in leaves:
        if v in given:
            run_leaves.append((slots[v], "input", v))
        elif v in g.attr_of:
            a = g.attr_of[v]
            kind = "param" if a in params else "buffer"
            if kind == "buffer" and v not in hooked:
                fixed[v] = buffers[a]
            else:
                run_leaves.append((slots[v], kind, a))
        else:
            fixed[v] = consts[v]
            if v in hooked:
                run_leaves.append((slots[v], "fixed", consts[v]))
    for v, t in fixed.items():
        if v not in hooked:
            run_leaves.append((slots[v], "fixed", t))
    # Static values the fast steps or the caller read, filled from the warm-up run.
    fast_reads = {x for n in fast_nodes for x in n.inputs if x} | set(wanted)
    record = {slots[v]: host_slot.get(v, -1) for v in value_static & fast_reads}
    bufs = tuple((g.attr_of[v], t, tensor_version(t)) for v, t in fixed.items() if v in g.attr_of)
    return Plan(nslots, steps_for(nodes, False), fast_nodes, steps_for, run_leaves, record,
                 {v: slots[v] for v in hooked if v in leaves}, [(w, slots[w]) for w in wanted], recorded={},
                 buffers=bufs)


def record_static(plan: Plan, env: list, outs) -> None:
    """Keep the static values a warm-up step computed (`outs`: its output slots)."""
    for s in ((outs,) if type(outs) is int else outs):
        if s in plan.record:
            plan.recorded[s] = env[s]

def finish_warmup(plan: Plan) -> None:
    """After the warm-up run: the template of static values, the fast steps (non-static nodes only), and the
    per-run leaves that remain."""
    template: list = [None] * plan.nslots
    fixed = {s: t for s, kind, t in plan.leaves if kind == "fixed"}
    hooked = set(plan.hooked.values())
    for s, h in plan.record.items():
        t = plan.recorded.get(s, fixed.get(s))
        if t is None:
            continue
        t = t.detach()
        template[s] = t
        if h >= 0:
            template[h] = t.cpu()
    plan.template, plan.recorded = template, None
    plan.fast_steps = plan.steps_for(plan.fast_nodes, True)
    # Static leaves now live in the template; only per-run leaves stay.
    plan.leaves = [(s, k, t) for s, k, t in plan.leaves
                   if not (k == "fixed" and template[s] is not None and s not in hooked)]


def tensor_version(t: torch.Tensor) -> int:
    """In-place modification counter (inference-mode tensors have none: -1)."""
    return -1 if t.is_inference() else t._version
