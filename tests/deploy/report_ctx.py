"""A ReportContext on the tiny SAM (full model, 128 px) quantized W4A4, built without the CLI so that report
sections can be tested one by one: "this run" = MSE calibration, baseline = min/max calibration."""
from __future__ import annotations

from pathlib import Path

from carsam_onnx.calib.feeds import build_feeds, image_size
from carsam_onnx.calib.registry import check_config
from carsam_onnx.config import BitWidths, QuantConfig
from carsam_onnx.deploy.report import ReportContext
from carsam_onnx.modelio import load_model, save_model
from carsam_onnx.quantize import _plan, calibration_samples, emit_model
from tiny_sam import tiny_sam_paths


def tiny_report_context(folder: Path, *, baseline: bool = True, num_calib: int = 2) -> ReportContext:
    path = tiny_sam_paths()["full"]
    config = QuantConfig(bits=BitWidths(4, 4), method="minmax", num_calib=num_calib)
    model, plan, _ = _plan(load_model(path), config)
    calib, held = calibration_samples(config, image_size(model), None, None)
    held = held[:1]                      # one held-out prompt keeps the sections' runs short
    feeds, held_feeds = build_feeds(model, calib, None, None), build_feeds(model, held, None, None)
    artifact = check_config(config).calibrate(model, plan, config, feeds, None)
    extra = {}
    if baseline:
        base_cfg = QuantConfig(bits=BitWidths(4, 4), method="percentile", num_calib=num_calib)
        extra["baseline"] = check_config(base_cfg).calibrate(model, plan, base_cfg, feeds, None)
    qmodel, _ = emit_model(model, plan, artifact, config)
    folder.mkdir(parents=True, exist_ok=True)
    q_path = folder / "q.onnx"
    save_model(qmodel, q_path, force=True)
    ctx = ReportContext(folder, Path(path), q_path, model, qmodel, plan, artifact, held_feeds, held, ["test"],
                        progress=False, extra=extra)
    return ctx
