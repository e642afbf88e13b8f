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

The simulated quantized model: every activation of the artifact fake-quantized where it is produced and
every plan weight replaced by its dequantized grid values. Emission quantizes a value only on the paths of
its listed consumers; a value that also feeds float nodes is quantized for those too here (on the SAM
decoder no plan activation has a float consumer that matters for the attention sites).

Heads and layout: the head count and width come from q_value's shape [B, H, N, d] (the Reshape that splits
heads); head h owns columns offset + h*d .. offset + (h+1)*d - 1 of the projection output, with offset 0
for separate projections and 0 / C / 2C for q / k / v of a fused qkv (C = H d). The mapping and any scale
between the projection output and the attention input (c in q_value = c (x W + b)) are checked numerically
on the FP run (moment matching over all tokens, so window partitions need no token map); a graph that does
not fit raises CalibrationError. attn.V and the exact Q.K^T solve need the projection input's rows to be
the attention's tokens (checked); windowed encoder attention gets the factored Q.K^T solve only.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ..artifact import CalibrationArtifact
from ..errors import CalibrationError
from ..qmath import dequantize_weight, quantize_weight
from ..passes.sites import AttentionSite, QuantPlan, Role
from . import mac
from ..torchexec import OnnxModule
from ..torchexec.fakequant import fake_quant

DECODER_ROLES = (Role.DECODER_SELF, Role.DECODER_TOKEN_TO_IMAGE, Role.DECODER_IMAGE_TO_TOKEN,
                 Role.DECODER_FINAL_TOKEN_TO_IMAGE)
QK_MODES = ("q", "k", "qk", "none")
LAYOUT_RTOL = 1e-3


@dataclass(frozen=True)
class MacConfig:
    """(Defaults belong in config.py once MAC is wired into --method; kept here while it is not.)"""

    lam_rel: float = 10.0          # lam = lam_rel * mean eigenvalue of the normal-equation operator (mac.py);
                                   # provisional: best summed held-out Q.K^T error of 1e-3..100 on seed 2
    qk: str = "q"                  # q: K's error into W_Q; k: Q's error into W_K; qk: both, W_Q first; none
    v: bool = True                 # the probabilities' error into W_V
    solve: str = "factored"        # factored | exact (see mac.py)
    roles: tuple[Role, ...] = DECODER_ROLES
    backtrack: int = 2             # halvings of a correction that raises the calibration error before dropping it

    def __post_init__(self):
        if self.qk not in QK_MODES:
            raise CalibrationError(f"MAC qk mode {self.qk!r}: choose one of {', '.join(QK_MODES)}")
        if self.solve not in ("factored", "exact"):
            raise CalibrationError(f"MAC solve {self.solve!r}: choose factored or exact")
        if not self.lam_rel > 0:
            raise CalibrationError(f"MAC lam_rel {self.lam_rel} must be > 0")


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
    """The plan's quantization simulated on an OnnxModule of the float model: replace hooks (see the
    module docstring). `hooks(float_weights)` rebuilds the weight hooks for corrected float weights."""

    def __init__(self, model: onnx.ModelProto, plan: QuantPlan, artifact: CalibrationArtifact):
        self.inits = {t.name: t for t in model.graph.initializer}
        self.weight_sites = {w.initializer: w for w in plan.weights if w.initializer in artifact.weights}
        self.artifact = artifact
        self._act_hooks = {}
        for value, aq in artifact.activations.items():
            if aq.bits >= 16:
                continue
            self._act_hooks[value] = _fake_quant_hook(torch.tensor(aq.scale, dtype=torch.float32),
                                                      float(aq.zero_point), aq.qmin, aq.qmax)
        self._wcache: dict[str, tuple[int, torch.Tensor]] = {}

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

    def hooks(self, float_weights: dict) -> dict:
        h = dict(self._act_hooks)
        for name in self.weight_sites:
            h[name] = _const_hook(self._qweight(name, float_weights))
        for name, value in float_weights.items():
            if name not in self.weight_sites:          # biases: float, corrected
                h[name] = _const_hook(torch.from_numpy(np.asarray(value, dtype=np.float32)))
        return h


def _fake_quant_hook(scale: torch.Tensor, zero_point: float, qmin: int, qmax: int):
    return lambda v: fake_quant(v, scale.to(v.dtype), zero_point, qmin, qmax)


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
            p = op.scale * torch.stack([x_fp @ w_aug[:, c] for c in op.cols])        # [H, N, d]
            st.add(x_q, p, of, oq)
    W = op.scale * torch.stack([w_aug[:, c] for c in op.cols])
    dW = mac.solve_qk(st, W, st.lam(config.lam_rel, solve), method=solve) / op.scale
    return mac.scatter_heads(w_aug, op.cols, dW)


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


def mac_site(model: onnx.ModelProto, plan: QuantPlan, artifact: CalibrationArtifact, site: AttentionSite,
             feeds: list[dict], config: MacConfig = MacConfig(), *, module: OnnxModule | None = None,
             sim: QuantSim | None = None, float_weights: dict | None = None) -> dict[str, np.ndarray]:
    """Corrected float weights and biases of one attention site's projections, keyed by initializer names.

    float_weights: corrections already made (earlier sites); the quantized runs use them. `module` (an
    OnnxModule of `model`, FP) and `sim` may be passed to reuse them across sites."""
    module = module if module is not None else OnnxModule(model).eval()
    sim = sim if sim is not None else QuantSim(model, plan, artifact)
    fw = dict(float_weights or {})
    inits = sim.inits
    projs = {k: find_projection(model, n) for k, n in (("q", site.q_proj), ("k", site.k_proj), ("v", site.v_proj))}
    values = [site.q_value, site.k_value, site.probs_value, site.v_value] + [p.input for p in projs.values()]
    fp = _capture(module, feeds, values, None)
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
    qt = _capture(module, feeds, values, sim.hooks(fw))
    for side in steps:
        if side == "v":
            new_aug = _v_step(site, ops["v"], fp, qt, current["v"], config)
        else:
            new_aug = _qk_step(side, site, ops, fp, qt, current[side], config)
        err0 = _step_error(side, site, fp, qt)
        # Safeguard: the solve models neither the re-rounding of the corrected weight nor that of its own
        # output; keep the correction only where the simulated quantized model agrees on the calibration data
        # (halve it up to config.backtrack times, else drop it).
        for _ in range(config.backtrack + 1):
            upd = split_aug(projs[side], new_aug, inits)
            qt_new = _capture(module, feeds, values, sim.hooks({**fw, **upd}))
            if _step_error(side, site, fp, qt_new) <= err0:
                current[side] = new_aug
                fw.update(upd)
                out.update(upd)
                qt = qt_new
                break
            new_aug = 0.5 * (new_aug + current[side])
    return out


def _step_error(side: str, site: AttentionSite, fp: list[dict], qt: list[dict]) -> float:
    """Squared error, summed over the calibration feeds, of what a step corrects: the scores for the q / k
    steps, attn.V for the v step."""
    err = 0.0
    for f, q in zip(fp, qt):
        if side == "v":
            ref = f[site.probs_value] @ f[site.v_value]
            got = q[site.probs_value] @ q[site.v_value]
        else:
            ref = f[site.q_value] @ f[site.k_value]
            got = q[site.q_value] @ q[site.k_value]
        err += float((ref - got).pow(2).sum())
    return err


def mac_sites(model: onnx.ModelProto, plan: QuantPlan, artifact: CalibrationArtifact, feeds: list[dict],
              config: MacConfig = MacConfig(), sites: Iterable[AttentionSite] | None = None,
              module: OnnxModule | None = None) -> dict[str, np.ndarray]:
    """MAC on every site of `plan` whose role is in config.roles (graph order), each seeing the corrections
    of the sites before it; returns all corrected weights and biases (start: artifact.float_weights)."""
    module = module if module is not None else OnnxModule(model).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    sim = QuantSim(model, plan, artifact)
    fw = dict(artifact.float_weights)
    chosen = [s for s in (plan.attention if sites is None else sites) if s.role in config.roles]
    for site in chosen:
        fw.update(mac_site(model, plan, artifact, site, feeds, config, module=module, sim=sim, float_weights=fw))
    return fw


def qk_error(model: onnx.ModelProto, plan: QuantPlan, artifact: CalibrationArtifact, feeds: list[dict],
             float_weights: dict | None = None, sites: Iterable[AttentionSite] | None = None,
             module: OnnxModule | None = None) -> dict[str, float]:
    """Per site (keyed by its QK MatMul name): ||Q K^T - Q^ K^^T|| / ||Q K^T|| over `feeds`, the quantized
    model with `float_weights` against the FP model."""
    module = module if module is not None else OnnxModule(model).eval()
    sim = QuantSim(model, plan, artifact)
    sites = list(plan.attention if sites is None else sites)
    values = [v for s in sites for v in (s.q_value, s.k_value)]
    num = {s.qk_matmul: 0.0 for s in sites}
    den = dict(num)
    hooks = sim.hooks(dict(float_weights or {}))
    for f in feeds:
        a = _capture(module, [f], values, None)[0]
        b = _capture(module, [f], values, hooks)[0]
        for s in sites:
            ref = a[s.q_value] @ a[s.k_value]
            num[s.qk_matmul] += float((ref - b[s.q_value] @ b[s.k_value]).pow(2).sum())
            den[s.qk_matmul] += float(ref.pow(2).sum())
    return {k: (num[k] / den[k]) ** 0.5 if den[k] > 0 else 0.0 for k in num}
