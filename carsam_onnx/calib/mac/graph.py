"""The graph side of MAC: the projections as the graph stores them, the quantized model as emission writes it
(QuantSim), and the FP and quantized captures that MAC's solves read (Runner).

The simulated quantized model is the one emission writes: every activation site fake-quantized on the inputs of
its listed consumers only (quant points), every plan weight replaced by its dequantized grid values.

SAM's image encoder merges batch and heads ([B*H, N, d]) where the decoder keeps them apart ([B, H, N, d]):
encoder captures are split back into [B, H, ...] with H = the q projection's width over d (site_heads).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ...artifact import CalibrationArtifact
from ...errors import CalibrationError
from ...passes.quant_points import insert_quant_points
from ...passes.sites import AttentionSite, QuantPlan
from ...qmath import dequantize_weight, quantize_weight
from ...torchexec import OnnxModule
from ...torchexec.fakequant import fake_quant
from ...torchexec.precision import ieee_fp32
from . import solve as mac


# ------------------------------------------------------------------------------------------- projections

@dataclass(frozen=True)
class Projection:
    """A linear layer y = x W + b as the graph stores it: MatMul (+ Add of a bias) or Gemm."""

    node: str
    input: str                 # the value x
    weight: str                # initializer name
    transposed: bool           # stored [out, in] (Gemm transB=1)
    bias: str | None           # initializer name of b (None: no bias)
    alpha: float = 1.0         # Gemm: y = alpha x W + beta b
    beta: float = 1.0


def find_projection(model: onnx.ModelProto, node_name: str) -> Projection:
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    node = next((n for n in g.node if n.name == node_name), None)
    if node is None or node.op_type not in ("MatMul", "Gemm") or node.input[1] not in inits:
        raise CalibrationError(f"MAC: projection {node_name!r} is not a MatMul/Gemm with an initializer weight")
    w = inits[node.input[1]]
    if node.op_type == "Gemm":
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0):
            raise CalibrationError(f"MAC: Gemm {node_name!r} with transA=1 is not supported")
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if bias is not None and (bias not in inits or int(np.prod(inits[bias].dims)) != _out_dim(w, attrs.get("transB", 0))):
            raise CalibrationError(f"MAC: Gemm {node_name!r} has a bias that is no per-output initializer")
        return Projection(node_name, node.input[0], w.name, bool(attrs.get("transB", 0)), bias,
                          float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0)))
    if len(w.dims) != 2:
        raise CalibrationError(f"MAC: projection {node_name!r} has a weight of rank {len(w.dims)}, expected 2")
    users = [n for n in g.node if node.output[0] in n.input]
    bias = None
    if len(users) == 1 and users[0].op_type == "Add":
        other = [x for x in users[0].input if x != node.output[0]]
        if len(other) == 1 and other[0] in inits and int(np.prod(inits[other[0]].dims)) == w.dims[1]:
            bias = other[0]
    return Projection(node_name, node.input[0], w.name, False, bias)


def _out_dim(w: onnx.TensorProto, trans_b: int) -> int:
    return int(w.dims[0] if trans_b else w.dims[1])


def _float_init(model_inits: dict, float_weights: dict, name: str) -> np.ndarray:
    if name in float_weights:
        return np.asarray(float_weights[name], dtype=np.float32)
    return numpy_helper.to_array(model_inits[name]).astype(np.float32)


def weight_aug(proj: Projection, model_inits: dict, float_weights: dict) -> torch.Tensor:
    """[in + 1, out] float64: alpha W (as x W) with the bias (times beta) as the last row."""
    w = _float_init(model_inits, float_weights, proj.weight)
    w = w.T if proj.transposed else w
    b = None if proj.bias is None else _float_init(model_inits, float_weights, proj.bias).reshape(-1)
    wt = torch.from_numpy(np.ascontiguousarray(w)).double() * proj.alpha
    bt = None if b is None else torch.from_numpy(b).double() * proj.beta
    return mac.augmented_weight(wt, bt)


def split_aug(proj: Projection, w_aug: torch.Tensor, model_inits: dict) -> dict[str, np.ndarray]:
    """Inverse of weight_aug: {weight name: array in the stored layout, bias name: array} (float32)."""
    w = (w_aug[:-1] / proj.alpha).numpy()
    w = w.T if proj.transposed else w
    out = {proj.weight: np.ascontiguousarray(w).astype(np.float32)
           .reshape(tuple(model_inits[proj.weight].dims))}
    if proj.bias is not None:
        out[proj.bias] = (w_aug[-1] / proj.beta).numpy().astype(np.float32).reshape(tuple(model_inits[proj.bias].dims))
    return out


# ------------------------------------------------------------------------------------- quantized model

class QuantSim:
    """The plan's quantization simulated as emission writes it: the model with a quant point (an Identity,
    passes/quant_points.py) per activation site, read by that site's listed consumers only,
    fake-quantized by a replace hook; every plan weight replaced by its dequantized grid values.
    `hooks(float_weights)` rebuilds the weight hooks for corrected float weights. `module` (the augmented
    model) serves the FP runs too (no hooks: the Identities change nothing)."""

    def __init__(self, model: onnx.ModelProto, plan: QuantPlan, artifact: CalibrationArtifact):
        self.model, self.qpoint = insert_quant_points(model, plan)
        self.module = OnnxModule(self.model).eval()
        self.module.requires_grad_(False)
        self._inputs = {n.name: set(n.input) for n in self.model.graph.node}
        self.inits = {t.name: t for t in model.graph.initializer}
        self.weight_sites = {w.initializer: w for w in plan.weights if w.initializer in artifact.weights}
        self.artifact = artifact
        self._act_hooks = {}
        for value, aq in artifact.activations.items():
            if aq.bits >= 16 or value not in self.qpoint:
                continue
            self._act_hooks[self.qpoint[value]] = _fake_quant_hook(torch.tensor(aq.scale, dtype=torch.float32),
                                                                   float(aq.zero_point), aq.qmin, aq.qmax)
        self._wcache: dict[str, tuple[int, torch.Tensor]] = {}

    def seen(self, value: str, node: str) -> str:
        """The name under which `node` reads `value`: its quant point if `node` is a listed consumer."""
        q = self.qpoint.get(value)
        return q if q is not None and q in self._inputs.get(node, ()) else value

    def site(self, site: AttentionSite) -> AttentionSite:
        """`site` with its operand values as its two MatMuls read them."""
        return replace(site, q_value=self.seen(site.q_value, site.qk_matmul),
                       k_value=self.seen(site.k_value, site.qk_matmul),
                       probs_value=self.seen(site.probs_value, site.av_matmul),
                       v_value=self.seen(site.v_value, site.av_matmul))

    def projection(self, model: onnx.ModelProto, node: str) -> Projection:
        """find_projection, with the input as the projection reads it."""
        p = find_projection(model, node)
        return replace(p, input=self.seen(p.input, node))

    def _qweight(self, name: str, float_weights: dict) -> torch.Tensor:
        w = _float_init(self.inits, float_weights, name)
        key = hash(w.tobytes())
        hit = self._wcache.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        wq = self.artifact.weights[name]
        t = torch.from_numpy(dequantize_weight(quantize_weight(w, wq), wq))
        self._wcache[name] = (key, t)
        return t

    def hooks(self, float_weights: dict, device: torch.device | str = "cpu") -> dict:
        """Replace hooks for `module.run`: activation fake-quant and the weights, on `device`."""
        h = dict(self._act_hooks)
        for name in self.weight_sites:
            h[name] = _const_hook(self._qweight(name, float_weights).to(device))
        for name, value in float_weights.items():
            if name not in self.weight_sites:          # biases: float, corrected
                h[name] = _const_hook(torch.from_numpy(np.asarray(value, dtype=np.float32)).to(device))
        return h


def _fake_quant_hook(scale: torch.Tensor, zero_point: float, qmin: int, qmax: int):
    return lambda v: fake_quant(v, scale.to(device=v.device, dtype=v.dtype), zero_point, qmin, qmax)


def _const_hook(t: torch.Tensor):
    return lambda _: t


def _to_torch(feed: dict) -> dict:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feed.items()}


def capture_values(module: OnnxModule, feeds: list[dict], values: list[str], replace: dict | None) -> list[dict]:
    values = list(dict.fromkeys(values))
    with torch.no_grad():
        return [{k: v.detach().double() for k, v in
                 module.run(_to_torch(f), outputs=[], capture=values, replace=replace).items()} for f in feeds]


# ----------------------------------------------------------------------------------------------- layout


class Runner:
    """FP and simulated-quantized captures over a fixed list of feeds. The part of the graph that no
    correctable projection influences (a full model's image encoder and neck under the decoder scope; the
    prompt encoder) gives the same values at every step: it runs once per feed, and later runs start where it
    meets the rest (OnnxModule.run's `start`).

    `device`: where those once-per-feed runs go. For a full model they are the expensive part of MAC (the
    image encoder), so they run where calibration runs (IEEE float32, no TF32); the cut values come back to
    the CPU, where every later capture and every solve runs."""

    def __init__(self, sim: QuantSim, feeds: list[dict], dirty: set[str], wanted: list[str],
                 device: torch.device | str = "cpu", heads: dict[str, int] | None = None):
        self.module, self.sim, self.feeds = sim.module, sim, [_to_torch(f) for f in feeds]
        self.heads = dict(heads or {})     # value -> heads, for values captured as [B*heads, ...] (_split_heads)
        module = sim.module
        cut = _fixed_cut(sim.model, dirty, wanted)
        self.fp_cut: list[dict] = []
        self.q_cut: list[dict] = []
        if cut:
            dev = torch.device(device)
            moved = dev.type != "cpu"
            hooks = sim.hooks({}, device=dev)
            if moved:
                module.to(dev)
            try:
                with torch.no_grad(), ieee_fp32():
                    for f in self.feeds:
                        f = {k: v.to(dev) for k, v in f.items()}
                        self.fp_cut.append(_host(module.run(f, outputs=[], capture=cut)))
                        self.q_cut.append(_host(module.run(f, outputs=[], capture=cut, replace=hooks)))
            finally:
                if moved:                      # back to the CPU; drop the plans and constants cached on `dev`
                    module.to("cpu")
                    module.invalidate()

    def capture(self, values: list[str], float_weights: dict | None) -> list[dict]:
        """Per feed {value: float64 tensor}; float_weights None: the FP model, else the quantized model
        with these corrected float weights."""
        values = list(dict.fromkeys(values))
        hooks = None if float_weights is None else self.sim.hooks(float_weights)
        cuts = self.fp_cut if float_weights is None else self.q_cut
        out = []
        with torch.no_grad():
            for i, f in enumerate(self.feeds):
                start = cuts[i] if cuts else None
                have = {k: start[k] for k in values if start is not None and k in start}
                rest = [v for v in values if v not in have]
                got = self.module.run(f, outputs=[], capture=rest, replace=hooks, start=start) if rest else {}
                out.append({k: _split_heads(v.detach().double(), self.heads.get(k))
                            for k, v in {**have, **got}.items()})
        return out


def _split_heads(v: torch.Tensor, heads: int | None) -> torch.Tensor:
    """SAM's image encoder feeds its attention MatMuls [B*heads, N, d] (and [B*heads, N, N] probabilities):
    -> [B, heads, ...], the decoder's layout, which MAC's per-head solves index."""
    if heads is None or v.dim() != 3:
        return v
    if v.shape[0] % heads:
        raise CalibrationError(f"MAC: attention value of batch {v.shape[0]}, not a multiple of {heads} heads")
    return v.reshape(v.shape[0] // heads, heads, *v.shape[1:])


def site_heads(sim: QuantSim, model: onnx.ModelProto, sites: list[AttentionSite], feed: dict) -> dict[str, int]:
    """value -> heads for the sites whose attention values come with batch and heads merged (SAM's image encoder,
    [B*heads, N, d]): heads = the q projection's output width (a third of it when q, k and v are one fused
    projection) over the head width, read from one FP run of `feed`."""
    merged = {t.q_value: t for t in map(sim.site, sites)}   # the values as the MatMuls read them
    if not merged:
        return {}
    with torch.no_grad():
        got = sim.module.run(_to_torch(feed), outputs=[], capture=list(merged))
    out: dict[str, int] = {}
    for name, s in merged.items():
        q = got[name]
        if q.dim() != 3:
            continue
        width = weight_aug(sim.projection(model, s.q_proj), sim.inits, {}).shape[1]
        width //= 3 if s.q_proj == s.k_proj == s.v_proj else 1
        if width % q.shape[-1]:
            raise CalibrationError(f"MAC: {s.q_proj} gives {width} columns per projection, not a multiple of the "
                                   f"head width {q.shape[-1]}")
        out.update({v: width // q.shape[-1] for v in (s.q_value, s.k_value, s.probs_value, s.v_value)})
    return out


def _host(values: dict) -> dict:
    return {k: v.cpu() for k, v in values.items()}


def _fixed_cut(model: onnx.ModelProto, dirty: set[str], wanted: list[str]) -> list[str]:
    """Values that depend on no `dirty` initializer and are consumed by a node that does (or are `wanted`);
    empty when every node depends on one."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    moving: set[str] = set(dirty)
    const: set[str] = set(inits)
    changed = True
    while changed:       # to a fixpoint (one pass suffices for a sorted graph; the loop does not rely on it)
        changed = False
        for n in g.node:
            ins = [x for x in n.input if x]
            outs = [o for o in n.output if o]
            if any(x in moving for x in ins):
                grow, target = [o for o in outs if o not in moving], moving
            elif all(x in const for x in ins):
                grow, target = [o for o in outs if o not in const], const
            else:
                continue
            if grow:
                target.update(grow)
                changed = True
    const -= moving
    cut: set[str] = set()
    for n in g.node:
        if any(x in moving for x in n.input if x):
            cut.update(x for x in n.input if x and x not in moving and x not in const)
    cut.update(v for v in wanted if v not in moving and v not in const)
    cut -= {i.name for i in g.input}      # graph inputs are passed anyway
    return sorted(cut)


