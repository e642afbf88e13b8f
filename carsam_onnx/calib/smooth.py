"""Scale migration before calibration (`--smooth ALPHA`; SmoothQuant's rule, Xiao et al., 2023).

At every pair passes/smooth.py finds (a normalisation's affine parameters feeding quantized weight layers only),
per input channel c

    s_c = max|x_c| ^ alpha / max|W_c| ^ (1 - alpha)      (normalised to a geometric mean of 1)

with max|x_c| over the calibration feeds (the FP model) and max|W_c| over the weight layers' input channel c;
gamma and beta are divided by s and the weights' input channels multiplied by it. The FP function is unchanged
(to float rounding); the activation's outlier channels shrink toward the others, so a per-tensor 4-bit grid
resolves more of them, and the weights' per-output-channel scales take the difference. alpha 0 leaves the
activations as they are up to the weights' own spread; alpha 1 flattens the activations completely.

The method then calibrates the rewritten model, and the rewritten initializers go into the artifact's
float_weights (under the methods' own corrections, such as MAC's, which are computed from them), so the
emitted Q/DQ model holds them.
"""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ..artifact import CalibrationArtifact
from ..config import QuantConfig
from ..passes.sites import QuantPlan
from ..passes.smooth import SmoothPair, find_smooth_pairs
from ..torchexec import OnnxModule
from .baseline import to_torch

NO_PAIR_REASON = "a normalisation must feed only quantized weight layers, its parameters shared with no other node"
_FLOOR = 1e-5   # channels whose statistic is below this share of the largest are treated as this small


def migration_scales(x_absmax: np.ndarray, w_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """s per channel (module docstring), float64, geometric mean 1."""
    x = np.maximum(np.asarray(x_absmax, np.float64), _FLOOR * max(float(np.max(x_absmax)), 1e-30))
    w = np.maximum(np.asarray(w_absmax, np.float64), _FLOOR * max(float(np.max(w_absmax)), 1e-30))
    s = x ** alpha / w ** (1.0 - alpha)
    return s / np.exp(np.mean(np.log(s)))


def channel_absmax(module: OnnxModule, feeds: list[dict], pairs: list[SmoothPair], device: str) -> dict:
    """value -> max |x| per channel over `feeds` (the FP graph)."""
    out: dict[str, torch.Tensor] = {}

    def hook(pair: SmoothPair):
        def observe(x: torch.Tensor) -> None:
            m = x.detach().abs().movedim(pair.channel_axis, -1).reshape(-1, pair.channels).amax(0).double()
            out[pair.value] = m if pair.value not in out else torch.maximum(out[pair.value], m)
        return observe

    with torch.no_grad(), module.value_hooks({p.value: hook(p) for p in pairs}):
        for feed in feeds:
            module.run(to_torch(feed, device))
    return {k: v.cpu().numpy() for k, v in out.items()}


def smooth_model(model: onnx.ModelProto, plan: QuantPlan, feeds: list[dict], alpha: float,
                 device: str = "cpu") -> tuple[onnx.ModelProto, dict[str, np.ndarray], list[SmoothPair]]:
    """(a copy of `model` with every pair's scales migrated, the rewritten initializers by name, the pairs)."""
    pairs = find_smooth_pairs(model, plan)
    if not pairs:
        return model, {}, pairs
    module = OnnxModule(model).to(device).eval()
    x_absmax = channel_absmax(module, feeds, pairs, device)
    del module
    inits = {t.name: t for t in model.graph.initializer}
    changed: dict[str, np.ndarray] = {}
    for p in pairs:
        ws = [(numpy_helper.to_array(inits[name]), axis) for name, axis in p.weights]
        w_absmax = np.max([np.abs(np.moveaxis(w, a, 0)).reshape(p.channels, -1).max(1) for w, a in ws], axis=0)
        s = migration_scales(x_absmax[p.value], w_absmax, alpha)
        for name in (p.gamma, p.beta):
            v = numpy_helper.to_array(inits[name])
            changed[name] = (v.astype(np.float64) / s.reshape(v.shape)).astype(v.dtype)
        for (name, axis), (w, _) in zip(p.weights, ws):
            shape = [1] * w.ndim
            shape[axis] = p.channels
            changed[name] = (w.astype(np.float64) * s.reshape(shape)).astype(w.dtype)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name in changed:
            t.CopyFrom(numpy_helper.from_array(changed[t.name], t.name))
    return out, changed, pairs


def calibrate_smoothed(calibrate, model: onnx.ModelProto, plan: QuantPlan, config: QuantConfig, feeds: list[dict],
                       progress=None, **kw) -> CalibrationArtifact:
    """`calibrate` (a registry method's function) on the model with config.smooth_alpha's scales migrated; the
    artifact (and any baseline artifact the method hands back through kw["baseline"]) carries the rewritten
    initializers as float_weights."""
    alpha = config.smooth_alpha
    if alpha is None:
        return calibrate(model, plan, config, feeds, progress, **kw)
    smoothed, changed, pairs = smooth_model(model, plan, feeds, alpha, config.device)
    if not pairs and config.smooth != "auto":
        warnings.warn(f"--smooth: no normalisation -> weight-layer pair to migrate in this graph ({NO_PAIR_REASON})",
                      stacklevel=3)
    art = calibrate(smoothed, plan, config, feeds, progress, **kw)
    for a in [art, *kw.get("baseline", [])]:
        a.float_weights = {**changed, **a.float_weights}
        a.info["smooth_alpha"] = f"{alpha:g}"
        a.info["smooth_pairs"] = str(len(pairs))
    return art
