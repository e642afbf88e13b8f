"""MAC at one attention site: the per-head layout of its projections, the Q.K^T and attn.V solves of solve.py
fed from the FP and quantized captures, and each step's strength chosen on held-back check images.

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

Heads and layout: the head count and width come from q_value's shape [B, H, N, d] (the Reshape that splits
heads; graph.site_heads for the encoder's merged layout). Head h owns columns offset + h*d .. offset + (h+1)*d - 1
of the projection output, with offset 0 for separate projections and 0 / C / 2C for q / k / v of a fused qkv
(C = H d). The mapping and any scale between the projection output and the attention input (c in
q_value = c (x W + b)) are checked numerically on the FP run (moment matching over all tokens, so window
partitions need no token map); a graph that does not fit raises CalibrationError. attn.V and the exact Q.K^T
solve need the projection input's rows to be the attention's tokens (checked); windowed encoder attention gets
the factored Q.K^T solve only.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch

from ...artifact import CalibrationArtifact
from ...config import MacConfig
from ...errors import CalibrationError
from ...passes.sites import AttentionSite, QuantPlan
from . import solve as mac
from .graph import Projection, Runner, split_aug, weight_aug

LAYOUT_RTOL = 1e-3


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


def site_values(site: AttentionSite, projs: dict) -> list[str]:
    return [site.q_value, site.k_value, site.probs_value, site.v_value] + [p.input for p in projs.values()]


def mac_site(model: onnx.ModelProto, plan: QuantPlan, artifact: CalibrationArtifact, site: AttentionSite,
             runners: tuple[Runner, Runner], config: MacConfig, float_weights: dict,
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
    values = site_values(site, projs)
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
    qk_before = qk_rel_error(site, fp_check, qc)
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
                        qk_rel_error(site, fp_check, qc))
    return out, record


def _qk_sq(site: AttentionSite, fp: list[dict], qt: list[dict]) -> float:
    return sum(float((f[site.q_value] @ f[site.k_value] - q[site.q_value] @ q[site.k_value]).pow(2).sum())
               for f, q in zip(fp, qt))


def qk_rel_error(site: AttentionSite, fp: list[dict], qt: list[dict]) -> float:
    den = sum(float((f[site.q_value] @ f[site.k_value]).pow(2).sum()) for f in fp)
    return (_qk_sq(site, fp, qt) / den) ** 0.5 if den > 0 else 0.0


def _step_error(side: str, site: AttentionSite, fp: list[dict], qt: list[dict]) -> float:
    """Squared error, summed over feeds, of what a step corrects: the scores for the q / k steps, attn.V for
    the v step."""
    if side != "v":
        return _qk_sq(site, fp, qt)
    return sum(float((f[site.probs_value] @ f[site.v_value] - q[site.probs_value] @ q[site.v_value]).pow(2).sum())
               for f, q in zip(fp, qt))

