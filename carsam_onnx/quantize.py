"""The quantize pipeline: plan -> calibration data -> calibrate on the torch executor -> emit Q/DQ -> check.

    model --plan_quantization--> QuantPlan --calibrate--> CalibrationArtifact --emit_qdq--> Q/DQ model
"""
from __future__ import annotations

import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import QuantConfig
from .data.builtin import HELDOUT_SEED, builtin_calibration_set
from .data.prompts import load_calibration_set
from .errors import CalibrationError
from .modelio import check_writable, load_model, save_model

HELDOUT = 2   # held-out images (one box each) for the output SQNR in the summary


@dataclass
class QuantizeReport:
    output: Path
    weights_by_kind: dict[str, int]
    activations_by_kind: dict[str, int]
    attention_by_role: dict[str, int]
    kept_float: int
    sqnr_db: dict[str, float]            # graph output -> SQNR of quantized vs FP on held-out prompts
    input_bytes: int
    output_bytes: int
    warnings: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)   # wall time by stage

    def lines(self) -> list[str]:
        fmt = lambda d: ", ".join(f"{k} {v}" for k, v in d.items()) or "none"  # noqa: E731
        return [f"weights quantized: {sum(self.weights_by_kind.values())} ({fmt(self.weights_by_kind)}); "
                f"{self.kept_float} weight layers kept float",
                f"activations quantized: {sum(self.activations_by_kind.values())} ({fmt(self.activations_by_kind)})",
                f"attention sites: {sum(self.attention_by_role.values())} ({fmt(self.attention_by_role)})",
                "output SQNR vs FP on held-out prompts: " + ", ".join(f"{k} {v:.1f} dB" for k, v in self.sqnr_db.items()),
                f"size: {self.output_bytes / 1e6:.1f} MB ({self.output_bytes / max(self.input_bytes, 1):.3f}x of "
                f"{self.input_bytes / 1e6:.1f} MB) -> {self.output}",
                "time: " + ", ".join(f"{k} {v:.0f} s" for k, v in self.seconds.items())]


def file_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.name in (path.name, path.name + ".data"))


def calibration_samples(config: QuantConfig, image_size: int, calib_images, calib_prompts):
    """(calibration samples, held-out samples)."""
    if calib_images is None:
        calib = builtin_calibration_set(config.num_calib, config.seed, image_size)
        held = builtin_calibration_set(HELDOUT, config.seed, image_size, data_seed=HELDOUT_SEED, warn=False)
        return calib, held
    samples = load_calibration_set(calib_images, calib_prompts, config.num_calib + HELDOUT, config.seed, image_size)
    if len(samples) <= config.num_calib:
        warnings.warn(f"{calib_images} has no images left over for held-out prompts; the SQNR in the summary "
                      "is measured on calibration images", stacklevel=2)
        return samples, samples[:HELDOUT]
    return samples[: config.num_calib], samples[config.num_calib:]


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    noise = float(np.sum((ref.astype(np.float64) - test) ** 2))
    signal = float(np.sum(ref.astype(np.float64) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(max(signal, 1e-30) / noise)


def output_sqnr(fp_path: Path, q_path: Path, feeds: list[dict]) -> dict[str, float]:
    from .eval.runner import OrtRuntime

    rt = OrtRuntime()
    fp, q = rt.session(fp_path, "FP model"), rt.session(q_path, "quantized model")
    refs, tests = {}, {}
    for feed in feeds:
        for k, v in fp.run(feed).items():
            refs.setdefault(k, []).append(v)
        for k, v in q.run(feed).items():
            tests.setdefault(k, []).append(v)
    return {k: sqnr_db(np.concatenate([r.ravel() for r in refs[k]]), np.concatenate([t.ravel() for t in tests[k]]))
            for k in refs}


def calibrate(model, plan, config: QuantConfig, feeds: list[dict], progress=None):
    from .calib.calibrate import METHODS, calibrate_baseline

    if config.method in METHODS:
        return calibrate_baseline(model, plan, config, feeds, progress)
    raise CalibrationError(f"--method {config.method!r} is not available; choose one of {', '.join(METHODS)}")


def quantize(model_path: str | Path, output: str | Path, config: QuantConfig = QuantConfig(), *,
             calib_images: str | Path | None = None, calib_prompts: str | Path | None = None,
             encoder: str | Path | None = None, embeddings: str | Path | None = None,
             force: bool = False, progress: bool = True) -> QuantizeReport:
    from tqdm import tqdm

    from .calib.feeds import build_feeds, image_size
    from .passes.emit_qdq import emit_qdq, target_options
    from .passes.plan import plan_quantization

    model_path, output = Path(model_path), Path(output)
    check_writable(output, force)
    clock = _Clock()
    model = load_model(model_path)
    notes: list[str] = []
    plan = plan_quantization(model, config)
    if not plan.attention:
        msg = "no attention block found: quantizing the linear layers only (see `carsam-onnx inspect`)"
        warnings.warn(msg, stacklevel=2)
        notes.append(msg)
    size = image_size(model)
    clock.lap("load and plan")
    calib, held = calibration_samples(config, size, calib_images, calib_prompts)
    feeds = build_feeds(model, calib, encoder, embeddings)
    held_feeds = build_feeds(model, held, encoder, embeddings)
    clock.lap("calibration data")
    with tqdm(total=len(feeds), desc=f"calibrating ({config.method}, {config.bits})", unit="img",
              disable=not progress or None) as bar:
        artifact = calibrate(model, plan, config, feeds, bar)
    clock.lap("calibration")
    qmodel = emit_qdq(model, plan, artifact, **target_options(config))
    if config.target == "trt":
        from .passes.trt_rules import check_trt, errors, format_report

        violations = check_trt(qmodel)
        if errors(violations):
            notes.append("TensorRT rules: " + format_report(violations).replace("\n", "; "))
            warnings.warn(notes[-1], stacklevel=2)
    save_model(qmodel, output, force=force)
    clock.lap("emit and save")
    report = QuantizeReport(
        output=output,
        weights_by_kind=dict(Counter(w.kind.value for w in plan.weights)),  # "constant": INT8 position tables
        activations_by_kind=dict(Counter(a.kind.value for a in plan.activations)),
        attention_by_role=dict(Counter(s.role.value for s in plan.attention)),
        kept_float=len(plan.kept_float), sqnr_db={}, input_bytes=file_bytes(model_path),
        output_bytes=file_bytes(output), warnings=notes)
    try:
        report.sqnr_db = output_sqnr(model_path, output, held_feeds)
    except BaseException:   # a command that fails leaves no output behind
        output.unlink(missing_ok=True)
        output.with_name(output.name + ".data").unlink(missing_ok=True)
        raise
    clock.lap("held-out SQNR")
    report.seconds = clock.laps
    return report


class _Clock:
    def __init__(self):
        import time

        self._now = time.perf_counter
        self._t = self._now()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        t = self._now()
        self.laps[name] = t - self._t
        self._t = t


