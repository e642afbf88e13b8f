"""Run an ONNX graph as a differentiable torch module, addressed by ONNX names.

    module = OnnxModule(model)                       # float initializers -> nn.Parameters
    out = module(image=x)                            # {"image_embeddings": tensor}
    out = module.run({"image": x},                   # capture / intervene / sub-range
                     capture=["/image_encoder/blocks.0/attn/Softmax_output_0"],
                     replace={"q_value": lambda v: fake_quant(v, s, z)})
    module.param("image_encoder.blocks.0.attn.qkv.weight")   # by initializer name
    new_model = module.to_model_proto()             # parameters written back under their names

How a run is executed. Each distinct request (device, shapes and dtypes of the given tensors, requested
values, replaced values) gets a *plan* (plan.py), kept for later runs of the same request: the nodes the
requested values need, found backwards from them and stopping at the given tensors (so `start=` runs a
sub-range of the graph). Values that depend only on constants and on tensor shapes (Shape -> Gather -> Concat
-> Reshape chains of TorchScript exports) are *static*: the first run of a plan computes them, later runs of
the same plan reuse them and skip their nodes. Integer initializers (buffers) count as constants for this: a
plan whose buffers were changed in place or replaced is rebuilt. Values are freed after their last consumer ran.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from contextlib import contextmanager
from typing import Callable, Iterable, Mapping

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from ..errors import InputError, ModelError, first_line
from .ops import FLOAT_TYPES, ONNX_TO_TORCH, NodeCtx, RunState, lookup, parse_attrs, tensor_from_proto
from .plan import GraphView, Node, Plan, finish_warmup, make_plan, record_static, tensor_version

Hook = Callable[[torch.Tensor], "torch.Tensor | None"]
_MAX_PLANS = 64


def _sanitize(name: str, used: set[str]) -> str:
    base = re.sub(r"\W", "_", name) or "t"
    if base[0].isdigit():
        base = "t_" + base
    cand, i = base, 1
    while cand in used:
        cand, i = f"{base}_{i}", i + 1
    used.add(cand)
    return cand


def _copy_fields(dst, src, skip: str = "") -> None:
    for fd, value in src.ListFields():
        if fd.name == skip:
            continue
        if fd.is_repeated:
            getattr(dst, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def _graph_skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` without initializer data (they are written back from the module)."""
    skel = onnx.ModelProto()
    _copy_fields(skel, model, skip="graph")
    _copy_fields(skel.graph, model.graph, skip="initializer")
    return skel


class OnnxModule(nn.Module):
    """An ONNX model as a torch.nn.Module (see the module docstring).

    Float initializers become nn.Parameters (requires_grad=True), other initializers buffers, all
    addressable by their ONNX names through `param(name)`, `buffer(name)`, `params_by_name`.
    """

    def __init__(self, model: onnx.ModelProto, *, fold_constants: bool = True) -> None:
        super().__init__()
        if not isinstance(model, onnx.ModelProto):
            raise InputError(f"OnnxModule needs an onnx.ModelProto, got {type(model).__name__}")
        g = model.graph
        if len(g.sparse_initializer):
            raise ModelError("sparse initializers are not supported by the torch executor; densify them first")
        self._state = RunState()
        self.initializers = nn.Module()
        self._attr_of: dict[str, str] = {}
        self._init_order: list[str] = []
        self._init_types: dict[str, int] = {}
        used: set[str] = set()
        for t in g.initializer:
            tensor = tensor_from_proto(t, f"initializer '{t.name}': ")
            attr = _sanitize(t.name, used)
            if t.data_type in FLOAT_TYPES:
                self.initializers.register_parameter(attr, nn.Parameter(tensor, requires_grad=True))
            else:
                self.initializers.register_buffer(attr, tensor)
            self._attr_of[t.name] = attr
            self._init_order.append(t.name)
            self._init_types[t.name] = t.data_type
        self.input_names = [i.name for i in g.input if i.name not in self._attr_of]
        self._input_dtypes = {i.name: ONNX_TO_TORCH.get(i.type.tensor_type.elem_type) for i in g.input
                              if i.name not in self._attr_of and i.type.HasField("tensor_type")}
        self.output_names = [o.name for o in g.output]
        self._skeleton = _graph_skeleton(model)

        opsets = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}
        types = dict(self._init_types)
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                types[vi.name] = vi.type.tensor_type.elem_type
        for n in g.node:
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
                for a in n.attribute:
                    if a.name == "value":
                        types[n.output[0]] = a.t.data_type
        self._nodes: list[Node] = []
        for i, n in enumerate(self._toposort(g)):
            opset = opsets.get("" if n.domain == "ai.onnx" else n.domain, 0)
            spec = lookup(n, opset)
            ctx = NodeCtx(n, opset, self._state, parse_attrs(n), [types.get(x, 0) for x in n.input],
                          [types.get(x, 0) for x in n.output])
            self._nodes.append(Node(i, n.name, n.op_type, tuple(n.input), tuple(n.output), spec, spec.build(ctx)))
        self._producer = {o: node for node in self._nodes for o in node.outputs if o}
        self._consts: dict[str, torch.Tensor] = {}
        self._folded: set[int] = set()
        if fold_constants:
            self._fold()
        self._graph = GraphView(self._nodes, self._producer, self._attr_of, self._consts, self.input_names)
        self._const_on: dict[torch.device, dict[str, torch.Tensor]] = {}
        self._plans: OrderedDict = OrderedDict()
        self._hooks: dict[str, Hook] = {}

    # ---- construction helpers ---------------------------------------------------------------------------

    @staticmethod
    def _toposort(g: onnx.GraphProto) -> list[onnx.NodeProto]:
        known = {t.name for t in g.initializer} | {i.name for i in g.input} | {""}
        done, pending, order = set(known), list(g.node), []
        while pending:
            rest = []
            for n in pending:
                if all(x in done for x in n.input):
                    order.append(n)
                    done.update(n.output)
                else:
                    rest.append(n)
            if len(rest) == len(pending):
                missing = sorted({x for n in rest for x in n.input if x not in done})[:3]
                raise ModelError(f"graph has a cycle or undefined values (e.g. {missing}); "
                                 "it is not a valid ONNX graph")
            pending = rest
        return order

    def _fold(self) -> None:
        """Evaluate, once, the nodes that depend only on Constant nodes."""
        with torch.no_grad():
            for node in self._nodes:
                ins = [x for x in node.inputs if x]
                if node.spec.data_dependent_shape or not all(x in self._consts for x in ins):
                    continue
                out = node.fn(*[self._consts[x] if x else None for x in node.inputs])
                outs = out if isinstance(out, tuple) else (out,)
                for name, v in zip(node.outputs, outs):
                    if name:
                        self._consts[name] = v
                self._folded.add(node.index)

    # ---- names ------------------------------------------------------------------------------------------

    @property
    def params_by_name(self) -> dict[str, nn.Parameter]:
        p = self.initializers._parameters
        return {n: p[a] for n, a in self._attr_of.items() if a in p}

    @property
    def buffers_by_name(self) -> dict[str, torch.Tensor]:
        b = self.initializers._buffers
        return {n: b[a] for n, a in self._attr_of.items() if a in b}

    def param(self, name: str) -> nn.Parameter:
        p = self.initializers._parameters.get(self._attr_of.get(name, ""))
        if p is None:
            raise InputError(f"no float initializer named {name!r} in this model")
        return p

    def buffer(self, name: str) -> torch.Tensor:
        b = self.initializers._buffers.get(self._attr_of.get(name, ""))
        if b is None:
            raise InputError(f"no non-float initializer named {name!r} in this model")
        return b

    def value_names(self) -> set[str]:
        """Every value a run can capture or replace."""
        return set(self.input_names) | set(self._attr_of) | set(self._producer)

    def producer(self, value: str) -> str | None:
        """Name of the node that computes `value` (None for inputs and initializers)."""
        n = self._producer.get(value)
        return n.name if n is not None else None

    # ---- hooks ------------------------------------------------------------------------------------------

    def set_value_hook(self, name: str, fn: Hook) -> None:
        """Call fn on value `name` whenever a run computes it; a returned tensor replaces the value,
        None keeps it (observers)."""
        self._check_names([name], "hooked")
        self._hooks[name] = fn

    def remove_value_hook(self, name: str) -> None:
        self._hooks.pop(name, None)

    @contextmanager
    def value_hooks(self, hooks: Mapping[str, Hook]):
        """Temporarily set hooks: `with module.value_hooks({name: fn}): ...`."""
        old = {k: self._hooks.get(k) for k in hooks}
        for k, fn in hooks.items():
            self.set_value_hook(k, fn)
        try:
            yield self
        finally:
            for k, fn in old.items():
                if fn is None:
                    self._hooks.pop(k, None)
                else:
                    self._hooks[k] = fn

    def invalidate(self) -> None:
        """Forget cached plans and static values (buffer changes are detected without it)."""
        self._plans.clear()
        self._const_on.clear()

    def _check_names(self, names: Iterable[str], what: str) -> None:
        known = self.value_names()
        unknown = [n for n in names if n not in known]
        if unknown:
            more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
            raise InputError(f"{what} value names not in the graph: {', '.join(map(repr, unknown[:3]))}{more}")

    # ---- running ----------------------------------------------------------------------------------------

    def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.run(inputs)

    def run(self, inputs: Mapping[str, torch.Tensor] | None = None, *, outputs: Iterable[str] | None = None,
            capture: Iterable[str] = (), replace: Mapping[str, Hook] | None = None,
            start: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Compute `outputs` (default: the graph outputs) and the `capture`d values, by ONNX value name.

        replace: value name -> fn(tensor) -> tensor, applied where the value is produced (fake-quant goes
            here); for an initializer, applied to the parameter at the start of the run.
        start: intermediate values given instead of computed: only the nodes between them and the
            requested values run (block-wise reconstruction). Graph inputs they make unnecessary may be
            left out of `inputs`.
        """
        inputs = {k: v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v))
                  for k, v in (inputs or {}).items()}
        given = {**inputs, **(start or {})}
        wanted = list(dict.fromkeys(list(self.output_names if outputs is None else outputs) + list(capture)))
        hooks = {**self._hooks, **(replace or {})}
        bad_inputs = [k for k in inputs if k not in self.input_names and k not in self._attr_of]
        if bad_inputs:
            raise InputError(f"unknown graph inputs {bad_inputs}; the graph's inputs are {self.input_names}")
        dev = self._device_of(given)
        key = (dev, tuple((k, tuple(v.shape), v.dtype) for k, v in given.items()), tuple(wanted),
               tuple(sorted(hooks)))
        plan = self._plans.get(key)
        if plan is not None and not self._buffers_unchanged(plan):
            plan = None
        if plan is None:
            self._check_names(wanted, "requested")
            self._check_names(hooks, "replaced")
            self._check_names(start or {}, "start")
            for k, v in inputs.items():
                want = self._input_dtypes.get(k)
                if want is not None and v.dtype != want:
                    raise InputError(f"graph input {k!r} is {v.dtype}; the graph declares {want}")
            plan = make_plan(self._graph, self.initializers._parameters, self.initializers._buffers, self._consts_on(dev),
                             set(given), wanted, set(hooks))
            self._plans[key] = plan
            if len(self._plans) > _MAX_PLANS:
                self._plans.popitem(last=False)
        self._state.device = dev
        return self._execute(plan, given, hooks)

    def _buffers_unchanged(self, plan: Plan) -> bool:
        b = self.initializers._buffers
        return all(b.get(a) is t and tensor_version(t) == v for a, t, v in plan.buffers)

    def _device_of(self, given: Mapping[str, torch.Tensor]) -> torch.device:
        for v in given.values():
            return v.device
        for p in self.initializers.parameters():
            return p.device
        for b in self.initializers.buffers():
            return b.device
        return torch.device("cpu")

    def _consts_on(self, dev: torch.device) -> dict[str, torch.Tensor]:
        d = self._const_on.get(dev)
        if d is None:
            d = self._const_on[dev] = {k: v.to(dev) for k, v in self._consts.items()}
        return d

    def _execute(self, plan: Plan, given: Mapping[str, torch.Tensor], hooks: Mapping[str, Hook]) -> dict:
        warm = plan.template is None
        env = [None] * plan.nslots if warm else list(plan.template)
        params, buffers = self.initializers._parameters, self.initializers._buffers
        for s, kind, key in plan.leaves:
            if kind == "input":
                env[s] = given[key]
            elif kind == "param":
                env[s] = params[key]
            elif kind == "buffer":
                env[s] = buffers[key]
            else:
                env[s] = key
        for v, s in plan.hooked.items():
            r = hooks[v](env[s])
            if r is not None:
                env[s] = r
        steps = plan.steps if warm else plan.fast_steps
        for fn, ins, outs, frees, hk, node in steps:
            try:
                r = fn(*[env[i] if i >= 0 else None for i in ins])
            except (InputError, ModelError):
                raise
            except Exception as e:
                raise ModelError(f"{node.op_type} node '{node.name}' failed: {type(e).__name__}: "
                                 f"{first_line(e)}") from e
            if type(outs) is int:
                if outs >= 0:
                    env[outs] = r
            else:
                rs = r if isinstance(r, tuple) else (r,)
                for s, t in zip(outs, rs):
                    if s >= 0:
                        env[s] = t
            for s, v in hk:
                h = hooks[v](env[s])
                if h is not None:
                    env[s] = h
            if warm:
                record_static(plan, env, outs)
            for s in frees:
                env[s] = None
        result = {w: env[s] for w, s in plan.outputs}
        if warm:
            finish_warmup(plan)
        return result

    # ---- write back -------------------------------------------------------------------------------------

    def to_model_proto(self) -> onnx.ModelProto:
        """The model with every initializer taken from the module's current parameters and buffers
        (same names, order and ONNX types); everything else as given."""
        m = onnx.ModelProto()
        m.CopyFrom(self._skeleton)
        inits = []
        for name in self._init_order:
            a = self._attr_of[name]
            t = self.initializers._parameters.get(a)
            t = self.initializers._buffers[a] if t is None else t
            inits.append(_to_tensor_proto(t.detach(), name, self._init_types[name]))
        m.graph.initializer.extend(inits)
        return m


def _to_tensor_proto(t: torch.Tensor, name: str, onnx_type: int) -> onnx.TensorProto:
    import ml_dtypes

    T = onnx.TensorProto
    if onnx_type == T.BFLOAT16:
        arr = t.float().cpu().numpy().astype(ml_dtypes.bfloat16)
    elif onnx_type in (T.INT4, T.UINT4):
        arr = t.cpu().numpy().astype(ml_dtypes.int4 if onnx_type == T.INT4 else ml_dtypes.uint4)
    else:
        arr = t.cpu().numpy().astype(onnx.helper.tensor_dtype_to_np_dtype(onnx_type), copy=False)
    return numpy_helper.from_array(arr, name)
