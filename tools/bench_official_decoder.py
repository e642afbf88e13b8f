"""segment-anything's own decoder export vs the project's split export of the same weights, quantized the same
way (decoder only, calibration embeddings from the FP encoder) and evaluated as encoder + decoder pairs.

    python tools/bench_official_decoder.py --workdir WORK --num-images 200 --bits w8a8 w4a4 --method mse

Writes WORK/{ref.onnx, ref.encoder.onnx, ref.decoder.onnx, ref.official_decoder.onnx, val/, *.json} and prints
one markdown row per (bits, decoder): segm mAP, AP50, mIoU, and the difference official - own.
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from carsam_onnx import api  # noqa: E402
from carsam_onnx.config import BitWidths, ExportConfig, QuantConfig  # noqa: E402
from carsam_onnx.data.synth import write_synthetic_coco  # noqa: E402
from carsam_onnx.deploy.official_export import export_official_decoder  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--model-type", default="reference")
    ap.add_argument("--num-images", type=int, default=200)
    ap.add_argument("--bits", nargs="+", default=["w8a8", "w4a4"])
    ap.add_argument("--method", default="mse")
    ap.add_argument("--decoders", nargs="+", default=["own", "own_mm", "official"],
                    help="which decoders to run (the table shows those with results)")
    a = ap.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    parts = api.split_paths(work / "ref.onnx")
    if not parts["decoder"].exists():
        api.export(parts["full"], ExportConfig(model_type=a.model_type, split=True, force=True))
    # segment-anything's export with return_single_mask picks, for a prompt of <= 2 points (a box), the best of
    # the 3 multimask outputs by predicted IoU; the project's --multimask export + eval's best-by-IoU does the same
    mm = api.split_paths(work / "refmm.onnx")
    if not mm["decoder"].exists() and "own_mm" in a.decoders:
        api.export(mm["full"], ExportConfig(model_type=a.model_type, split=True, multimask=True, force=True))
    official = work / "ref.official_decoder.onnx"
    if not official.exists():
        export_official_decoder(official, a.model_type, force=True)
    val = work / "val"
    if not (val / "annotations.json").exists():
        write_synthetic_coco(val, a.num_images, 2, force=True)
    results = {}

    def evaluate(tag, decoder):
        out = work / f"eval_{tag}.json"
        if out.exists():
            return json.loads(out.read_text())
        r = api.evaluate([parts["encoder"], decoder], dataset=val, limit=a.num_images, progress=False)
        r.write_json(out)
        print(f"{tag}: {r.summary()}", flush=True)
        return r.to_json()

    decoders = [(n, d) for n, d in (("own", parts["decoder"]), ("own_mm", mm["decoder"]), ("official", official))
                if n in a.decoders]
    for name, dec in decoders:
        results[f"fp/{name}"] = evaluate(f"fp_{name}", dec)
    for bits in a.bits:
        for name, dec in decoders:
            q = work / f"{dec.stem}.{bits}.{a.method}.onnx"
            if not q.exists():
                cfg = QuantConfig(bits=BitWidths.parse(bits), method=a.method)
                rep = api.quantize(dec, q, cfg, encoder=parts["encoder"], force=True, progress=False)
                print(f"quantized {q.name}: " + "; ".join(rep.lines()[3:5]), flush=True)
            results[f"{bits}/{name}"] = evaluate(f"{bits}_{a.method}_{name}", q)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    print(f"\n{datetime.date.today()}, commit {commit}, {a.num_images} images (`data synth --seed 2`), "
          f"decoder quantized with --method {a.method}, FP encoder\n")
    print("| setting | decoder | segm mAP | AP50 | mIoU | official - this (mAP) |")
    print("|---|---|---|---|---|---|")
    labels = {"own": "project split export (1 mask)", "own_mm": "project split export (--multimask, best by IoU)",
              "official": "segment-anything export (SamOnnxModel)"}
    for bits in ["fp", *a.bits]:
        off = results.get(f"{bits}/official")
        for name, _ in decoders:
            r = results[f"{bits}/{name}"]
            diff = f"{off['segm_mAP'] - r['segm_mAP']:+.2f}" if name != "official" and off else ""
            print(f"| {bits.upper()} | {labels[name]} | {r['segm_mAP']:.2f} | {r['AP50']:.2f} | {r['mIoU']:.4f} | {diff} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
