"""MatMul-Aware Compensation (MAC, CAR-SAM) on the attention sites of a graph: closed-form corrections of the
q, k and v projections' float weights that move one attention operand's quantization error into the other
operand's projection, returned keyed by ONNX initializer names (CalibrationArtifact.float_weights).

    artifact = apply_mac(model, plan, artifact, feeds, config.mac)

solve.py holds the math (the Sylvester and ridge solves, torch only); graph.py the projections, the simulated
quantized model and the captures; site.py one site's solves and the check that keeps each step only where it
lowers the error on held-back images; this module runs the sites in graph order and records what was done.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable

import numpy as np
import onnx
import torch

from ...artifact import CalibrationArtifact
from ...config import MacConfig
from ...errors import CalibrationError
from ...passes.sites import AttentionSite, QuantPlan, Role
from .graph import QuantSim, Runner, capture_values, find_projection, site_heads
from .site import SiteRecord, mac_site, qk_rel_error, site_values

DECODER_ROLES = (Role.DECODER_SELF, Role.DECODER_TOKEN_TO_IMAGE, Role.DECODER_IMAGE_TO_TOKEN,
                 Role.DECODER_FINAL_TOKEN_TO_IMAGE)


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
    correction touches runs (Runner); everything else runs on the CPU."""
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
    wanted = [v for s in chosen for v in site_values(sim.site(s), projs[s.qk_matmul])]
    fit_feeds, check_feeds = split_feeds(list(feeds), config.check_fraction)
    encoder = [s for s in chosen if s.role not in DECODER_ROLES]     # the decoder's layout is [B, H, N, d]
    heads = site_heads(sim, model, encoder, fit_feeds[0]) if fit_feeds else {}
    runners = (Runner(sim, fit_feeds, dirty, wanted, device, heads),
               Runner(sim, check_feeds, dirty, wanted, device, heads))
    all_check = [v for t in map(sim.site, chosen) for v in (t.q_value, t.k_value, t.probs_value, t.v_value)]
    fp_check = runners[1].capture(all_check, None)
    fw = dict(artifact.float_weights)
    qc0 = runners[1].capture(all_check, fw)
    records = []
    for site in chosen:
        base = qk_rel_error(sim.site(site), fp_check, qc0)
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
        a = capture_values(sim.module, [f], values, None)[0]
        b = capture_values(sim.module, [f], values, hooks)[0]
        for s in sites:
            ref = a[s.q_value] @ a[s.k_value]
            num[s.qk_matmul] += float((ref - b[s.q_value] @ b[s.k_value]).pow(2).sum())
            den[s.qk_matmul] += float(ref.pow(2).sum())
    return {k: (num[k] / den[k]) ** 0.5 if den[k] > 0 else 0.0 for k in num}
