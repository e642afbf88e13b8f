"""Baseline calibration on the torch executor: observe the plan's activations, choose weight scales.

MinMax, Percentile and MSE differ only in the activation observer (observers.py) and, for MSE, in a
per-channel clipping search for the weights. The result is a CalibrationArtifact keyed by ONNX names.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ..artifact import CalibrationArtifact
from ..config import QuantConfig
from ..errors import CalibrationError
from ..qmath import WeightQuant, activation_quant_from_range, symmetric_scale, weight_quant_from_minmax
from ..passes.plan import CONSTANT_BITS
from ..passes.sites import QuantPlan, WeightKind
from ..torchexec import OnnxModule
from .observers import OBSERVERS, make_observer, weight_channel_absmax


def to_torch(feed: dict[str, np.ndarray], device: str) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in feed.items()}


def observe_activations(module: OnnxModule, feeds: Iterable[dict], values: list[str], config: QuantConfig,
                        progress=None) -> dict:
    """Run the FP graph over `feeds` with an observer hooked on each value; return value -> observer."""
    observers = {v: make_observer(config.method, config.percentile, config.seed, config.device)
                 for v in values}
    hooks = {v: obs.observe for v, obs in observers.items()}
    with torch.no_grad(), module.value_hooks(hooks):
        for feed in feeds:
            module.run(to_torch(feed, config.device))
            if progress is not None:
                progress.update(1)
    bad = [v for v, o in observers.items() if o.nonfinite]
    if bad:
        raise CalibrationError(f"NaN or infinite activations at {len(bad)} values (first: {bad[0]}) on the "
                               "calibration data; check the inputs")
    unseen = [v for v, o in observers.items() if not o.seen]
    if unseen:
        raise CalibrationError(f"{len(unseen)} activation values were never computed (first: {unseen[0]})")
    return observers


def weight_quant(w: np.ndarray, axis: int, config: QuantConfig) -> WeightQuant:
    bits = config.layer_weight_bits    # 7 for 8-bit weights under format "s7" (config.py)
    if config.method != "mse" or config.block_size:
        return weight_quant_from_minmax(w, axis, bits, config.block_size)
    absmax = weight_channel_absmax(torch.from_numpy(w).to(config.device), axis, "mse", bits).cpu().numpy()
    return WeightQuant(scale=symmetric_scale(absmax, bits), axis=axis, bits=bits)


def calibrate_baseline(model: onnx.ModelProto, plan: QuantPlan, config: QuantConfig, feeds: list[dict],
                       progress=None, module: OnnxModule | None = None) -> CalibrationArtifact:
    if config.method not in OBSERVERS:
        raise CalibrationError(f"--method {config.method!r}: baseline methods are {', '.join(OBSERVERS)}")
    inits = {t.name: t for t in model.graph.initializer}
    art = CalibrationArtifact(info={"method": config.method, "bits": str(config.bits), "target": config.target,
                                    "num_calib": str(len(feeds))})
    if config.int8_format_applies:
        art.info["int8_weights"] = config.int8_weight_format
    for site in plan.weights:
        w = numpy_helper.to_array(inits[site.initializer]).astype(np.float32)
        if site.kind is WeightKind.CONSTANT:   # position tables: INT8 per channel, min-max (passes/plan.py)
            art.weights[site.initializer] = weight_quant_from_minmax(w, site.axis, CONSTANT_BITS)
        else:
            art.weights[site.initializer] = weight_quant(w, site.axis, config)
    if config.bits.quantize_activations and plan.activations:
        if module is None:
            module = OnnxModule(model).to(config.device).eval()
        values = [a.value for a in plan.activations]
        observers = observe_activations(module, feeds, values, config, progress)
        sym = config.symmetric_activations
        for v, obs in observers.items():
            lo, hi = obs.range(config.bits.activation, sym)
            art.activations[v] = activation_quant_from_range(lo, hi, config.bits.activation, sym)
    art.check_names(model)
    return art
