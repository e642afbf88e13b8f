"""Shared checks of the reconstruction tests (tests/calib/recon/): calibration and held-out samples, and "the
fake-quant model after reconstruction equals the emitted Q/DQ file" (executor bit for bit, ORT by SQNR)."""
from __future__ import annotations

import warnings
from dataclasses import replace

import onnxruntime as ort
import torch

from carsam_onnx.calib.baseline import to_torch
from carsam_onnx.passes.emit import emit_qdq, target_options
from carsam_onnx.qmath import sqnr_db
from carsam_onnx.quantize import calibration_samples
from carsam_onnx.torchexec import OnnxModule

MIN_SQNR_DB = 40.0   # tiny SAM: torch after reconstruction vs the emitted file in ORT (issue 11, item 3)
HELD_OUT = 6


def _samples(cfg, size):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calib, _ = calibration_samples(cfg, size, None, None)
        held, _ = calibration_samples(replace(cfg, seed=5, num_calib=HELD_OUT), size, None, None)
    return calib, held


def _check_emitted_equals_torch(model, plan, cfg, art, r, held_feeds, min_db: float | None = MIN_SQNR_DB):
    qmodel = emit_qdq(model, plan, art, **target_options(cfg))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(qmodel.SerializeToString(), so, providers=["CPUExecutionProvider"]) if min_db else None
    executor = OnnxModule(qmodel).eval()
    dbs = []
    with torch.no_grad():
        for feed in held_feeds:
            mine = r.module.run(to_torch(feed, "cpu"), outputs=["low_res_masks"], replace=r.hooks())["low_res_masks"]
            emitted = executor.run(to_torch(feed, "cpu"))["low_res_masks"]
            assert torch.equal(mine, emitted)
            if sess is not None:
                dbs.append(sqnr_db(mine.numpy(), sess.run(["low_res_masks"], feed)[0]))
    if min_db is not None:
        assert min(dbs) >= min_db, f"torch vs ORT per image: {[round(d, 1) for d in dbs]} dB"
    return qmodel
