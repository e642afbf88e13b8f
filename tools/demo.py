"""The main job, end to end on the bundled reference model (what `make demo` runs):

1. write the synthetic validation set (its own seed, disjoint from training and calibration data),
2. export the trained reference SAM to ONNX,
3. quantize it W8A8 (MinMax) and W4A4, with the best calibrator alone (MSE) and with CAR-SAM (reconstruction +
   MAC + JCAR, the CPU default schedule; built-in calibration set, 32 images),
4. evaluate FP and quantized models in ONNX Runtime (COCO segm mAP with ground-truth boxes) and print a table.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from carsam_onnx import api
from carsam_onnx.config import BitWidths, ExportConfig, QuantConfig
from carsam_onnx.data.builtin import VALIDATION_SEED
from carsam_onnx.data.synth import write_synthetic_coco
from carsam_onnx.errors import CarsamError
from carsam_onnx.quantize import quantize

# W4A4: the best calibrator-only method of the accuracy table (docs/results.md), MSE range search, and the
# project's method on top of it, CAR-SAM
SETTINGS = (("w8a8", "minmax"), ("w4a4", "mse"), ("w4a4", "carsam"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("artifacts/demo"))
    ap.add_argument("--num-val", type=int, default=100, help="validation images")
    ap.add_argument("--num-calib", type=int, default=32)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    val = out / f"val_{args.num_val}_seed{VALIDATION_SEED}"
    if not (val / "annotations.json").is_file():
        write_synthetic_coco(val, args.num_val, VALIDATION_SEED, force=True)
    print(f"[{time.perf_counter() - t0:5.0f} s] validation set: {val}", flush=True)
    fp = out / "reference.onnx"
    api.export(fp, ExportConfig(model_type="reference", force=True))
    print(f"[{time.perf_counter() - t0:5.0f} s] exported {fp}", flush=True)
    models = {"FP32": fp}
    for bits, method in SETTINGS:
        q = out / f"reference.{bits}.{method}.onnx"
        rep = quantize(fp, q, QuantConfig(bits=BitWidths.parse(bits), method=method, num_calib=args.num_calib),
                       force=True, progress=method == "carsam")   # minutes on a CPU: bars per unit
        models[f"{bits.upper()} {method}"] = q
        sqnr = next(x for x in rep.lines() if x.startswith("output SQNR"))
        size = next(x for x in rep.lines() if x.startswith("size:"))
        print(f"[{time.perf_counter() - t0:5.0f} s] {bits} {method}: {sqnr}; {size}", flush=True)
    rows = []
    for name, path in models.items():
        r = api.evaluate(path, dataset=val, progress=False)
        rows.append((name, r, path.stat().st_size))
        print(f"[{time.perf_counter() - t0:5.0f} s] evaluated {name}", flush=True)
    fp_map = rows[0][1].segm_mAP
    print(f"\nreference SAM, {rows[0][1].num_instances} instances on {args.num_val} synthetic validation images "
          "(ground-truth boxes, ONNX Runtime CPU)")
    print(f"{'model':<22}{'segm mAP':>9}{'% of FP':>9}{'AP50':>7}{'AP75':>7}{'mIoU':>7}{'size MB':>9}")
    for name, r, size in rows:
        print(f"{name:<22}{r.segm_mAP:>9.1f}{100 * r.segm_mAP / max(fp_map, 1e-9):>8.1f}%{r.AP50:>7.1f}"
              f"{r.AP75:>7.1f}{r.mIoU:>7.3f}{size / 1e6:>9.1f}")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; models and data in {out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CarsamError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        sys.exit(2)
