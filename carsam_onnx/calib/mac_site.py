"""MAC on the attention sites of a graph: runs the FP and the (simulated) quantized model on the torch
executor, gathers the normal-equation terms of calib/mac.py per head, and returns corrected float weights
and biases keyed by ONNX initializer names (for CalibrationArtifact.float_weights).

What each solve sees (the choice for "K^ when X_Q and W_Q are themselves quantized"):
- target: the FP model's scores Q K^T (its q_value and k_value), FP probabilities and values for attn.V;
- X: the projection's input as the quantized model computes it, after that input's own fake-quant (the
  corrected weight multiplies exactly this in the deployed model, so the correction also absorbs the
  drift of everything upstream);
- the other operand (K^ for W_Q, Q^ for W_K, the probabilities A^ for W_V): the value as the quantized
  model's attention MatMul sees it: quantized inputs, quantized weights and the attention-input fake-quant;
- the weight being corrected is the float weight (with earlier corrections); its own rounding and the
  fake-quant of its own output are left out (they re-round whatever the correction does). The corrected
  weight is re-quantized with the artifact's weight scales (emission does the same: WeightQuant.values is
  None), clipped where it leaves their range.

The simulated quantized model (QuantSim) is the one emission writes: every activation site fake-quantized on
the inputs of its listed consumers only (quant points), every plan weight replaced by its dequantized grid
values.

Heads and layout: the head count and width come from q_value's shape [B, H, N, d] (the Reshape that splits
heads); SAM's image encoder merges batch and heads ([B*H, N, d]), so its captures are split back into
[B, H, ...] with H = the q projection's width over d (site_heads, _split_heads). Head h owns columns
offset + h*d .. offset + (h+1)*d - 1 of the projection output, with offset 0 for separate projections and
0 / C / 2C for q / k / v of a fused qkv (C = H d). The mapping and any scale between the projection output
and the attention input (c in q_value = c (x W + b)) are checked numerically on the FP run (moment matching
over all tokens, so window partitions need no token map); a graph that does not fit raises CalibrationError.
attn.V and the exact Q.K^T solve need the projection input's rows to be the attention's tokens (checked);
windowed encoder attention gets the factored Q.K^T solve only.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, replace

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ..artifact import CalibrationArtifact
from ..config import MacConfig
from ..errors import CalibrationError
from ..qmath import dequantize_weight, quantize_weight
from ..passes.sites import AttentionSite, QuantPlan, Role
from . import mac
from ..torchexec import OnnxModule
from ..torchexec.fakequant import fake_quant
from ..torchexec.precision import ieee_fp32

DECODER_ROLES = (Role.DECODER_SELF, Role.DECODER_TOKEN_TO_IMAGE, Role.DECODER_IMAGE_TO_TOKEN,
                 Role.DECODER_FINAL_TOKEN_TO_IMAGE)
LAYOUT_RTOL = 1e-3


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
    calib/recon/loop.insert_quant_points) per activation site, read by that site's listed consumers only,
    fake-quantized by a replace hook; every plan weight replaced by its dequantized grid values.
    `hooks(float_weights)` rebuilds the weight hooks for corrected float weights. `module` (the augmented
    model) serves the FP runs too (no hooks: the Identities change nothing)."""

    def __init__(self, model: onnx.ModelProto, plan: QuantPlan, artifact: CalibrationArtifact):
        from .recon.loop import insert_quant_points

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


def _capture(module: OnnxModule, feeds: list[dict], values: list[str], replace: dict | None) -> list[dict]:
    values = list(dict.fromkeys(values))
    with torch.no_grad():
        return [{k: v.detach().double() for k, v in
                 module.run(_to_torch(f), outputs=[], capture=values, replace=replace).items()} for f in feeds]


# ----------------------------------------------------------------------------------------------- layout

@dataclass
class _Operand:
    proj: Projection
    cols: list[torch.Tensor]     # per head, projection-output columns
    scale: float                 # value = scale * (x W + b)[cols]
    aligned: bool                # projection-input rows are the attention's tokens (per batch item)


def _heads_of_value(v: torch.Tensor, transposed: bool) -> torch.Tensor:
    """[B, H, N, d] (or [B, H, d, N] for K^T) -> [B, H, N, d]."""
    if v.dim() != 4:
        raise CalibrationError(f"MAC: attention input of rank {v.dim()}; expected [B, heads, tokens, head_dim]")
    return v.transpose(-1, -2) if transposed else v


def _layout(proj: Projection, which: int, w_aug: torch.Tensor, x_fp: list[torch.Tensor], val_fp: list[torch.Tensor],
            heads: int, head_dim: int) -> _Operand:
    out = w_aug.shape[1]
    c = heads * head_dim
    if out == c:
        offset = 0
    elif out == 3 * c:
        offset = which * c            # fused qkv: q, k, v
    else:
        raise CalibrationError(f"MAC: projection {proj.node} has {out} outputs; the attention uses {heads} heads "
                               f"x {head_dim} (expected {c} or {3 * c})")
    cols = mac.head_columns(heads, head_dim, offset)
    idx = torch.cat(cols)
    s1p = s1v = s2p = s2v = 0.0
    aligned = True
    for x, v in zip(x_fp, val_fp):
        p = (mac.augment(x.reshape(-1, x.shape[-1])) @ w_aug)[:, idx]            # [tokens, H d]
        vv = v.permute(0, 2, 1, 3).reshape(-1, c)                               # [B N, H d]
        s1p, s1v = s1p + p.sum(0), s1v + vv.sum(0)
        s2p, s2v = s2p + (p * p).sum(0), s2v + (vv * vv).sum(0)
        aligned = aligned and p.shape == vv.shape
    scale = float((s1p * s1v).sum() / (s1p * s1p).sum().clamp_min(1e-300))
    err1 = float((scale * s1p - s1v).norm() / s1v.norm().clamp_min(1e-300))
    err2 = float((scale * scale * s2p - s2v).norm() / s2v.norm().clamp_min(1e-300))
    if not (err1 < LAYOUT_RTOL and err2 < LAYOUT_RTOL):
        raise CalibrationError(f"MAC: the attention input does not match projection {proj.node}'s output columns "
                               f"(relative mismatch {max(err1, err2):.2g}); unsupported layout")
    if aligned:
        for x, v in zip(x_fp, val_fp):
            p = (mac.augment(x.reshape(-1, x.shape[-1])) @ w_aug)[:, idx] * scale
            vv = v.permute(0, 2, 1, 3).reshape(-1, c)
            if float((p - vv).norm() / vv.norm().clamp_min(1e-300)) > LAYOUT_RTOL:
                aligned = False
                break
    return _Operand(proj, cols, scale, aligned)


def _rows(x: torch.Tensor, batch: int) -> list[torch.Tensor]:
    """Projection input [.., in] -> per batch item [tokens, in + 1] (augmented)."""
    return list(mac.augment(x.reshape(batch, -1, x.shape[-1])).unbind(0))


# ------------------------------------------------------------------------------------------------ solves

def _qk_step(side: str, site: AttentionSite, ops: dict, fp: list[dict], qt: list[dict], w_aug: torch.Tensor,
             config: MacConfig) -> torch.Tensor:
    """Correction of the q (side "q") or k (side "k") projection's head columns; returns the new w_aug."""
    me, other = ("q", "k") if side == "q" else ("k", "q")
    op = ops[me]
    val = {"q": site.q_value, "k": site.k_value}
    solve = config.solve
    if solve == "exact" and not op.aligned:
        solve = "factored"
    st = mac.QKStats(keep_samples=solve == "exact")
    per_projection = config.granularity == "projection"
    cols = [torch.cat(op.cols)] if per_projection else op.cols
    for f, q in zip(fp, qt):
        o_fp = _heads_of_value(f[val[other]], other == "k")              # [B, H, M, d]
        o_q = _heads_of_value(q[val[other]], other == "k")
        batch = o_q.shape[0]
        if solve == "exact":      # x rows of batch item b are the queries of scores b (op.aligned)
            xs_fp, xs_q = _rows(f[op.proj.input], batch), _rows(q[op.proj.input], batch)
            pairs = [(xs_fp[b], xs_q[b], o_fp[b], o_q[b]) for b in range(batch)]
        else:                     # all pairs: only sums over tokens matter, no token map needed
            x_fp, x_q = _rows(f[op.proj.input], 1)[0], _rows(q[op.proj.input], 1)[0]
            pairs = [(x_fp, x_q, o_fp.transpose(0, 1).reshape(o_fp.shape[1], -1, o_fp.shape[-1]),
                      o_q.transpose(0, 1).reshape(o_q.shape[1], -1, o_q.shape[-1]))]
        for x_fp, x_q, of, oq in pairs:
            # target factors: P = this side's FP value in the rows of x, R = the other side's FP value
            p = op.scale * torch.stack([x_fp @ w_aug[:, c] for c in cols])           # [H, N, d] or [1, N, H d]
            if per_projection:
                of, oq = _merge_heads(of), _merge_heads(oq)
            st.add(x_q, p, of, oq)
    W = op.scale * torch.stack([w_aug[:, c] for c in cols])
    dW = mac.solve_qk(st, W, st.lam(config.lam_rel, solve), method=solve) / op.scale
    return mac.scatter_heads(w_aug, cols, dW)


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    """Per-head factors [H, M, d] -> [1, M, H d], columns head by head as the projection writes them: one problem
    whose target, P R^T, is the sum of the heads' score matrices (MacConfig.granularity "projection")."""
    return t.permute(1, 0, 2).reshape(1, t.shape[1], -1)


def _v_step(site: AttentionSite, op: _Operand, fp: list[dict], qt: list[dict], w_aug: torch.Tensor,
            config: MacConfig) -> torch.Tensor:
    st = mac.VStats()
    for f, q in zip(fp, qt):
        a_fp, a_q = f[site.probs_value], q[site.probs_value]                 # [B, H, Nq, Nk]
        v_fp = _heads_of_value(f[site.v_value], False)                       # [B, H, Nk, d]
        xs_q = _rows(q[op.proj.input], a_q.shape[0])
        for b in range(a_q.shape[0]):
            st.add(xs_q[b], a_fp[b], a_q[b], v_fp[b])
    W = op.scale * torch.stack([w_aug[:, c] for c in op.cols])
    dW = mac.solve_v(st, W, st.lam(config.lam_rel)) / op.scale
    return mac.scatter_heads(w_aug, op.cols, dW)


class _Runner:
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
    while changed:       # to a fixpoint: quant points are appended after their consumers
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


@dataclass
class SiteRecord:
    """What MAC did at one site: the strength kept per step (0: dropped) and its relative Q.K^T error on the
    check images: in the uncorrected model, before this site's steps (earlier sites corrected) and after."""

    site: str                          # QK MatMul name
    role: str
    block: int | None
    strengths: dict[str, float]        # step (q / k / v) -> strength kept
    check_baseline: float
    check_before: float
    check_after: float
    skipped: str = ""                  # why MAC left the site alone (an unsupported layout), or ""


def _site_values(site: AttentionSite, projs: dict) -> list[str]:
    return [site.q_value, site.k_value, site.probs_value, site.v_value] + [p.input for p in projs.values()]


def mac_site(model: onnx.ModelProto, plan: QuantPlan, artifact: CalibrationArtifact, site: AttentionSite,
             runners: tuple[_Runner, _Runner], config: MacConfig, float_weights: dict,
             fp_check: list[dict], baseline_check: float = float("nan")) -> tuple[dict[str, np.ndarray], SiteRecord]:
    """Corrected float weights and biases of one attention site's projections, keyed by initializer names.

    runners: (fit, check). Each step (q / k / v, config.qk and config.v) is solved on the fit images; its
    strength (config.shrink, applied to the change of the augmented weight) is chosen on the check images: the
    strength with the lowest error of what the step corrects (scores, or attn.V) there, if it is lower than
    without the step; else the step is dropped. `float_weights`: corrections already made (earlier sites).
    `fp_check`: the FP model's captures of this site's values on the check images; `baseline_check`: the
    site's relative Q.K^T error there in the uncorrected model (recorded only).

    Judging on images the solve did not see is what keeps MAC from raising held-out errors. Judging later
    sites' errors too does not help: a correction anywhere upstream moves their 4-bit errors by +-5-15% in
    either direction (rounding flips), and each later site's own correction, solved on the corrected
    upstream, absorbs that (docs/results.md, "MAC: lambda and mode chosen on seed 2")."""
    fit, check = runners
    sim = fit.sim
    fw = dict(float_weights)
    inits = sim.inits
    site = sim.site(site)
    projs = {k: sim.projection(model, n) for k, n in (("q", site.q_proj), ("k", site.k_proj), ("v", site.v_proj))}
    values = _site_values(site, projs)
    check_values = [site.q_value, site.k_value, site.probs_value, site.v_value]
    fp = fit.capture(values, None)
    heads, head_dim = fp[0][site.q_value].shape[1], fp[0][site.q_value].shape[-1]
    w0 = {k: weight_aug(p, inits, {}) for k, p in projs.items()}
    ops = {}
    for which, (k, vname, tr) in enumerate((("q", site.q_value, False), ("k", site.k_value, True),
                                            ("v", site.v_value, False))):
        vals = [_heads_of_value(f[vname], tr) for f in fp]
        ops[k] = _layout(projs[k], which, w0[k], [f[projs[k].input] for f in fp], vals, heads, head_dim)
    out: dict[str, np.ndarray] = {}
    current = {k: weight_aug(p, inits, fw) for k, p in projs.items()}
    steps = {"q": ["q"], "k": ["k"], "qk": ["q", "k"], "none": []}[config.qk]
    if config.v and ops["v"].aligned:
        steps.append("v")
    qt = fit.capture(values, fw)
    qc = check.capture(check_values, fw)
    qk_before = _qk_rel(site, fp_check, qc)
    kept: dict[str, float] = {}
    for side in steps:
        if side == "v":
            full = _v_step(site, ops["v"], fp, qt, current["v"], config)
        else:
            full = _qk_step(side, site, ops, fp, qt, current[side], config)
        err0 = _step_error(side, site, fp_check, qc)
        best = None
        for a in config.shrink:
            aug = current[side] + a * (full - current[side])
            upd = split_aug(projs[side], aug, inits)
            qc_new = check.capture(check_values, {**fw, **upd})
            err = _step_error(side, site, fp_check, qc_new)
            if err >= err0 or (best is not None and err >= best[1]):
                continue
            best = (a, err, aug, upd, qc_new)
        kept[side] = 0.0 if best is None else best[0]
        if best is None:
            continue
        _, _, aug, upd, qc = best
        current[side] = aug
        fw.update(upd)
        out.update(upd)
        if side != steps[-1]:
            qt = fit.capture(values, fw)
    record = SiteRecord(site.qk_matmul, site.role.value, site.block, kept, baseline_check, qk_before,
                        _qk_rel(site, fp_check, qc))
    return out, record


def _qk_sq(site: AttentionSite, fp: list[dict], qt: list[dict]) -> float:
    return sum(float((f[site.q_value] @ f[site.k_value] - q[site.q_value] @ q[site.k_value]).pow(2).sum())
               for f, q in zip(fp, qt))


def _qk_rel(site: AttentionSite, fp: list[dict], qt: list[dict]) -> float:
    den = sum(float((f[site.q_value] @ f[site.k_value]).pow(2).sum()) for f in fp)
    return (_qk_sq(site, fp, qt) / den) ** 0.5 if den > 0 else 0.0


def _step_error(side: str, site: AttentionSite, fp: list[dict], qt: list[dict]) -> float:
    """Squared error, summed over feeds, of what a step corrects: the scores for the q / k steps, attn.V for
    the v step."""
    if side != "v":
        return _qk_sq(site, fp, qt)
    return sum(float((f[site.probs_value] @ f[site.v_value] - q[site.probs_value] @ q[site.v_value]).pow(2).sum())
               for f, q in zip(fp, qt))


def scope_roles(scope: str) -> tuple[Role, ...]:
    """MacConfig.scope -> the attention roles it covers."""
    return DECODER_ROLES if scope == "decoder" else tuple(Role)


def _image_groups(feeds: list[dict]) -> list[list[dict]]:
    """Consecutive feeds that share their image input array (the same object: segment-anything's decoder export
    gets a "no mask" and a mask-refinement feed per prompt, calib/feeds.py) form one image's group."""
    groups: list[list[dict]] = []
    last = None
    for f in feeds:
        key = next((id(f[k]) for k in ("image_embeddings", "image") if k in f), None) if isinstance(f, dict) else None
        if groups and key is not None and key == last:
            groups[-1].append(f)
        else:
            groups.append([f])
        last = key
    return groups


def split_feeds(feeds: list[dict], check_fraction: float) -> tuple[list[dict], list[dict]]:
    """(fit, check): every k-th image, spread over the list, goes to the check part (at least one each); the
    feeds of one image (_image_groups) stay on one side."""
    groups = _image_groups(feeds)
    n = len(groups)
    if n < 2:
        raise CalibrationError(f"MAC needs at least 2 calibration images (one to fit, one to check); got {n}")
    n_check = min(n - 1, max(1, round(n * check_fraction)))
    idx = {int((j + 0.5) * n / n_check) for j in range(n_check)}
    return ([f for i, g in enumerate(groups) if i not in idx for f in g],
            [f for i, g in enumerate(groups) if i in idx for f in g])


def mac_sites(model: onnx.ModelProto, plan: QuantPlan, artifact: CalibrationArtifact, feeds: list[dict],
              config: MacConfig = MacConfig(), sites: Iterable[AttentionSite] | None = None,
              progress=None, *, device: torch.device | str = "cpu") -> tuple[dict[str, np.ndarray], list[SiteRecord]]:
    """MAC on every site of `plan` in config.scope (or `sites`), in graph order, each seeing the corrections of
    the sites before it. Returns all corrected float weights and biases (start: artifact.float_weights) and
    one record per site. `progress`: anything with update(1), called once per site. `device`: where the part no
    correction touches runs (_Runner); everything else runs on the CPU."""
    roles = scope_roles(config.scope)
    chosen = [s for s in (plan.attention if sites is None else sites) if s.role in roles]
    order = {s.qk_matmul: i for i, s in enumerate(plan.attention)}
    chosen.sort(key=lambda s: order.get(s.qk_matmul, len(order)))
    sim = QuantSim(model, plan, artifact)
    projs = {s.qk_matmul: {k: sim.projection(model, n) for k, n in (("q", s.q_proj), ("k", s.k_proj),
                                                                       ("v", s.v_proj))} for s in chosen}
    fixed = [n for s in chosen for p in projs[s.qk_matmul].values() for n in (p.weight, p.bias)
             if n is not None and artifact.weights.get(n) is not None and artifact.weights[n].values is not None]
    if fixed:
        raise CalibrationError(f"MAC: the artifact fixes the integer values of {fixed[0]} (AdaRound); run MAC before "
                               "rounding is learned")
    dirty = {n for ps in projs.values() for p in ps.values() for n in (p.weight, p.bias) if n is not None}
    wanted = [v for s in chosen for v in _site_values(sim.site(s), projs[s.qk_matmul])]
    fit_feeds, check_feeds = split_feeds(list(feeds), config.check_fraction)
    encoder = [s for s in chosen if s.role not in DECODER_ROLES]     # the decoder's layout is [B, H, N, d]
    heads = site_heads(sim, model, encoder, fit_feeds[0]) if fit_feeds else {}
    runners = (_Runner(sim, fit_feeds, dirty, wanted, device, heads),
               _Runner(sim, check_feeds, dirty, wanted, device, heads))
    all_check = [v for t in map(sim.site, chosen) for v in (t.q_value, t.k_value, t.probs_value, t.v_value)]
    fp_check = runners[1].capture(all_check, None)
    fw = dict(artifact.float_weights)
    qc0 = runners[1].capture(all_check, fw)
    records = []
    for site in chosen:
        base = _qk_rel(sim.site(site), fp_check, qc0)
        try:
            upd, rec = mac_site(model, plan, artifact, site, runners, config, fw, fp_check, base)
        except CalibrationError as e:
            if site.role in DECODER_ROLES:      # the decoder layout is supported: a failure there is a bug
                raise
            # encoder attention (scope "all") of a layout _layout does not map (SAM's own [B*heads, N, d] is
            # mapped, site_heads): the site is left alone and recorded
            warnings.warn(f"MAC skipped {site.role.value} attention {site.qk_matmul}: {e}", stacklevel=2)
            upd, rec = {}, SiteRecord(site.qk_matmul, site.role.value, site.block, {}, base, base, base, str(e))
        fw.update(upd)
        records.append(rec)
        if progress is not None:
            progress.update(1)
    return fw, records


def apply_mac(model: onnx.ModelProto, plan: QuantPlan, artifact: CalibrationArtifact, feeds: list[dict],
              config: MacConfig, progress=None, *, device: torch.device | str = "cpu") -> CalibrationArtifact:
    """MAC on `artifact` (a calibrator's: weight scales without fixed integer values): a copy whose
    float_weights hold the corrected projection weights and biases (emission writes them into the graph and
    quantizes them with the artifact's weight scales) and whose info records what was done. Deterministic on
    CPU. `feeds`: calibration feeds of `model` (the split into fit and check images is MacConfig's). `device`:
    where the part no correction touches (a full model's image encoder) runs; see mac_sites."""
    fw, records = mac_sites(model, plan, artifact, feeds, config, progress=progress, device=device)
    out = CalibrationArtifact(activations=dict(artifact.activations), weights=dict(artifact.weights),
                              float_weights=fw, info={**artifact.info, **mac_info(config, records, feeds)})
    out.check_names(model)
    return out


def mac_info(config: MacConfig, records: list[SiteRecord], feeds: list[dict]) -> dict[str, str]:
    """What MAC did, as artifact info entries (the quantize summary and the report read them)."""
    kept = sum(1 for r in records for a in r.strengths.values() if a > 0)
    dropped = sum(1 for r in records for a in r.strengths.values() if a == 0)
    fit, check = split_feeds(list(feeds), config.check_fraction)
    return {"mac": "on",
            "mac_config": ",".join(f"{k}={v}" for k, v in (("lam_rel", config.lam_rel), ("qk", config.qk),
                                                             ("v", config.v), ("solve", config.solve),
                                                             ("granularity", config.granularity),
                                                             ("scope", config.scope), ("when", config.when))),
            "mac_sites": str(len(records)),
            "mac_lam_rel": f"{config.lam_rel:g}",
            "mac_images": f"{len(fit)} fit, {len(check)} check",
            "mac_steps": f"{kept} kept, {dropped} dropped",
            "mac_skipped_sites": str(sum(bool(r.skipped) for r in records)),
            "mac_check_rises": str(sum(r.check_after > r.check_baseline for r in records)),
            "mac_check_qk_error": "; ".join(f"{r.role}:{r.block} {r.check_baseline:.4f}->{r.check_after:.4f} "
                                            + " ".join(f"{k}={a:g}" for k, a in r.strengths.items())
                                            for r in records)}


def mac_weight_names(model: onnx.ModelProto, plan: QuantPlan, config: MacConfig) -> set[str]:
    """The initializers MAC may correct: weights and biases of the q, k and v projections of config.scope's
    sites."""
    roles = scope_roles(config.scope)
    projs = [find_projection(model, n) for s in plan.attention if s.role in roles
             for n in (s.q_proj, s.k_proj, s.v_proj)]
    return {n for p in projs for n in (p.weight, p.bias) if n is not None}


def qk_error(model: onnx.ModelProto, plan: QuantPlan, artifact: CalibrationArtifact, feeds: list[dict],
             float_weights: dict | None = None, sites: Iterable[AttentionSite] | None = None,
             sim: QuantSim | None = None) -> dict[str, float]:
    """Per site (keyed by its QK MatMul name): ||Q K^T - Q^ K^^T|| / ||Q K^T|| over `feeds`, the quantized
    model (QuantSim; `sim` may be passed to reuse one) with `float_weights` against the FP model."""
    sim = sim if sim is not None else QuantSim(model, plan, artifact)
    sites = [sim.site(s) for s in (plan.attention if sites is None else sites)]
    values = [v for s in sites for v in (s.q_value, s.k_value)]
    num = {s.qk_matmul: 0.0 for s in sites}
    den = dict(num)
    hooks = sim.hooks(dict(float_weights or {}))
    for f in feeds:
        a = _capture(sim.module, [f], values, None)[0]
        b = _capture(sim.module, [f], values, hooks)[0]
        for s in sites:
            ref = a[s.q_value] @ a[s.k_value]
            num[s.qk_matmul] += float((ref - b[s.q_value] @ b[s.k_value]).pow(2).sum())
            den[s.qk_matmul] += float(ref.pow(2).sum())
    return {k: (num[k] / den[k]) ** 0.5 if den[k] > 0 else 0.0 for k in num}
