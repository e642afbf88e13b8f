"""MAC defaults by measurement on validation seed 2: held-out decoder output SQNR of the reference model,
W4A4 (calibrator --method mse) with and without MAC, for a grid of lam_rel and modes.

    python tools/mac_lambda.py [--num-calib 32] [--num-val 48] [--bits w4a4] [--method mse] \
        [--lams 0.1 1 10 100] [--modes q/v k/v qk/v q/- k/- qk/-] [--jobs-threads 2]

- Decoder-only reference model (exported once into .cache/), run by the torch executor (calib/mac/graph.QuantSim:
  the plan's quantization simulated, what emission writes), on FP encoder embeddings (the torch encoder).
- Calibration images: the built-in set (calibration seed 1); validation images: validation seed 2, one
  ground-truth box prompt each (never seed 7).
- Output: per setting the accumulated SQNR (dB) of low_res_masks and iou_predictions against the FP decoder,
  the summed relative Q.K^T error of the decoder sites and the MAC time; the baseline first. A mode is
  "QK/V": QK the MacConfig.qk mode, V "v" (attn.V correction on) or "-" (off). The lam grid runs with the
  first mode, the mode grid with the lam that gives the best mask SQNR.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def decoder_model():
    from carsam_onnx.export.models import REFERENCE_WEIGHTS, build_sam
    from carsam_onnx.export.onnx_export import export_onnx
    from carsam_onnx.modelio import load_model, save_model

    built = build_sam("reference")
    tag = hashlib.sha256(REFERENCE_WEIGHTS.read_bytes()).hexdigest()[:10]
    path = ROOT / ".cache" / "mac_lambda" / f"reference_decoder_{tag}.onnx"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_model(export_onnx(built, part="decoder"), path, force=True)
    return built, load_model(path)


def feeds(built, samples) -> list[dict]:
    with torch.no_grad():
        return [{"image_embeddings": built.sam.image_encoder(torch.from_numpy(s.image)).numpy(),
                 "point_coords": s.point_coords, "point_labels": s.point_labels} for s in samples]


def output_sqnr(module, sim, feeds_, float_weights, ref) -> dict[str, float]:
    from carsam_onnx.qmath import sqnr_from_sums

    hooks = sim.hooks(float_weights)
    sums = {k: [0.0, 0.0] for k in ("low_res_masks", "iou_predictions")}
    with torch.no_grad():
        for f, r in zip(feeds_, ref):
            out = module.run({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in f.items()}, replace=hooks)
            for k in sums:
                a, b = r[k].double(), out[k].double()
                sums[k][0] += float(a.pow(2).sum())
                sums[k][1] += float((a - b).pow(2).sum())
    return {k: sqnr_from_sums(*v) for k, v in sums.items()}


def main() -> None:
    from carsam_onnx.calib import mac as ms
    from carsam_onnx.calib.mac.graph import QuantSim
    from carsam_onnx.calib.baseline import calibrate_baseline
    from carsam_onnx.config import BitWidths, MacConfig, QuantConfig
    from carsam_onnx.data.builtin import VALIDATION_SEED, builtin_calibration_set
    from carsam_onnx.passes.plan import plan_quantization

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-calib", type=int, default=32)
    ap.add_argument("--num-val", type=int, default=48)
    ap.add_argument("--bits", default="w4a4")
    ap.add_argument("--method", default="mse")
    ap.add_argument("--lams", type=float, nargs="+", default=[0.1, 1.0, 10.0, 100.0])
    ap.add_argument("--modes", nargs="+", default=["q/v", "k/v", "qk/v", "q/-", "k/-", "qk/-"])
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if VALIDATION_SEED != 2:
        raise SystemExit("this tool tunes on validation seed 2 only")
    t0 = time.time()
    built, model = decoder_model()
    size = built.sam.image_encoder.img_size
    calib = feeds(built, builtin_calibration_set(a.num_calib, 0, size, warn=False))
    val = feeds(built, builtin_calibration_set(a.num_val, 0, size, data_seed=VALIDATION_SEED, warn=False))
    config = QuantConfig(bits=BitWidths.parse(a.bits), method=a.method)
    plan = plan_quantization(model, config)
    art = calibrate_baseline(model, plan, config, calib)
    sim = QuantSim(model, plan, art)
    module = sim.module
    with torch.no_grad():
        ref = [module.run({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in f.items()}) for f in val]
    sites = [s for s in plan.attention if s.role in ms.DECODER_ROLES]
    print(f"reference decoder {a.bits} {a.method}: {len(calib)} calibration images (seed 1), {len(val)} validation "
          f"prompts (seed {VALIDATION_SEED}); setup {time.time() - t0:.0f} s", flush=True)
    print(f"{'setting':24s} {'masks dB':>9s} {'iou dB':>8s} {'sum QK err':>10s} {'MAC s':>6s}  steps kept/dropped")

    def row(name, fw, secs, info=""):
        s = output_sqnr(sim.module, sim, val, fw, ref)
        qk = ms.qk_error(model, plan, art, val, fw, sites=sites, sim=sim)
        print(f"{name:24s} {s['low_res_masks']:9.2f} {s['iou_predictions']:8.2f} {sum(qk.values()):10.4f} "
              f"{secs:6.1f}  {info}", flush=True)
        return s["low_res_masks"]

    row("no MAC", {}, 0.0)

    def run(lam, mode):
        qk, v = mode.split("/")
        cfg = MacConfig(lam_rel=lam, qk=qk, v=v == "v")
        t = time.time()
        out = ms.apply_mac(model, plan, art, calib, cfg)
        return row(f"lam_rel={lam:g} {mode}", out.float_weights, time.time() - t, out.info["mac_steps"])

    by_lam = {lam: run(lam, a.modes[0]) for lam in a.lams}
    best = max(by_lam, key=by_lam.get)
    print(f"best lam_rel for {a.modes[0]}: {best:g}", flush=True)
    for mode in a.modes[1:]:
        run(best, mode)
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
