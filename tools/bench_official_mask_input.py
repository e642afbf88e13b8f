"""segment-anything's own decoder export, quantized with and without the mask-refinement calibration feeds
(`has_mask_input` 1, calib/feeds.py), scored on SAM's two prompt steps against the FP decoder.

    python tools/bench_official_mask_input.py --workdir WORK --num-images 20 --bits w8a8 w4a4 --method mse

Per ground-truth box of the first N images of `data synth --seed 2`: step 1 runs the decoder without a mask
(has_mask_input 0); step 2 feeds the FP decoder's step-1 low-res logits back with has_mask_input 1, the same
box, as SAM's interactive refinement does. It prints how the FP decoder's step 2 relates to its step 1 (mask
IoU, predicted IoU, logit magnitude), then for each quantized decoder, per step, the low-res logits'
SQNR against the FP decoder (over all boxes) and the mean IoU of the low-res masks (logit > 0) with the FP
decoder's. Each decoder is `carsam-onnx quantize official.onnx --encoder ref.encoder.onnx` (built-in calibration
set, --num-calib images) with `--no-calib-mask-input` ("0 only": no-mask feeds alone, the behaviour before the
refinement feeds) and with `--calib-mask-input` ("0 and 1", the default).
"""
from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from carsam_onnx import api  # noqa: E402
from carsam_onnx.calib.feeds import image_size, mask_refinement_feeds  # noqa: E402
from carsam_onnx.config import BitWidths, ExportConfig, QuantConfig  # noqa: E402
from carsam_onnx.data.coco import load_coco_dataset  # noqa: E402
from carsam_onnx.data.preprocess import preprocess_image  # noqa: E402
from carsam_onnx.data.prompts import box_inputs  # noqa: E402
from carsam_onnx.data.synth import write_synthetic_coco  # noqa: E402
from carsam_onnx.deploy.official_export import export_official_decoder  # noqa: E402
from carsam_onnx.modelio import load_model  # noqa: E402
from carsam_onnx.qmath import sqnr_db  # noqa: E402
from carsam_onnx.runtime import OrtRuntime  # noqa: E402
from carsam_onnx.samgraph import no_mask_inputs  # noqa: E402


def quantize_official(decoder: Path, encoder: Path, config: QuantConfig, out: Path) -> Path:
    """`carsam-onnx quantize DECODER -o OUT --encoder ENCODER` with `config` (kept when it exists)."""
    if not out.exists():
        api.quantize(decoder, out, config, encoder=encoder, force=True, progress=False)
    return out


def test_feeds(encoder: Path, decoder_model, dataset: Path, num_images: int) -> list[dict]:
    """Step-1 feeds (no mask) for every ground-truth box of the first `num_images` images."""
    ds = load_coco_dataset(dataset)
    size = image_size(decoder_model)
    enc = OrtRuntime().session(encoder, "encoder")
    feeds = []
    for image_id in ds.image_ids[:num_images]:
        tensor, geo = preprocess_image(ds.read_image(image_id), size)
        emb = next(iter(enc.run({"image": tensor}).values()))
        for ann in ds.coco.imgToAnns[image_id]:
            x, y, w, h = ann["bbox"]
            coords, labels = box_inputs(np.array([x, y, x + w, y + h]), geo)
            feeds.append({"image_embeddings": emb, "point_coords": coords[:1], "point_labels": labels[:1],
                          **no_mask_inputs(size)})
    return feeds


def score(fp_sess, q_model, feeds) -> tuple[float, float]:
    """(SQNR of low_res_masks in dB over all feeds, mean IoU of the low-res masks at logit > 0)."""
    q_sess = OrtRuntime().session(q_model, "quantized decoder")
    refs, tests, ious = [], [], []
    for f in feeds:
        r, t = fp_sess.run(f)["low_res_masks"], q_sess.run(f)["low_res_masks"]
        refs.append(r.ravel())
        tests.append(t.ravel())
        a, b = r > 0, t > 0
        ious.append(np.logical_and(a, b).sum() / max(np.logical_or(a, b).sum(), 1))
    return sqnr_db(np.concatenate(refs), np.concatenate(tests)), float(np.mean(ious))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--model-type", default="reference")
    ap.add_argument("--num-images", type=int, default=20, help="test images of `data synth --seed 2`")
    ap.add_argument("--num-calib", type=int, default=QuantConfig().num_calib)
    ap.add_argument("--bits", nargs="+", default=["w8a8", "w4a4"])
    ap.add_argument("--method", default="mse")
    a = ap.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    parts = api.split_paths(work / "ref.onnx")
    if not parts["encoder"].exists():
        api.export(parts["full"], ExportConfig(model_type=a.model_type, split=True, force=True))
    official = work / "ref.official_decoder.onnx"
    if not official.exists():
        export_official_decoder(official, a.model_type, force=True)
    val = work / "val"
    if not (val / "annotations.json").exists():
        write_synthetic_coco(val, a.num_images, 2, force=True)
    fp_model = load_model(official)
    step1 = test_feeds(parts["encoder"], fp_model, val, a.num_images)
    step2 = mask_refinement_feeds(fp_model, step1)
    fp_sess = OrtRuntime().session(official, "FP decoder")
    fp1, fp2 = [fp_sess.run(f) for f in step1], [fp_sess.run(f) for f in step2]
    overlap = [np.logical_and(a["low_res_masks"] > 0, b["low_res_masks"] > 0).sum()
               / max(np.logical_or(a["low_res_masks"] > 0, b["low_res_masks"] > 0).sum(), 1) for a, b in zip(fp1, fp2)]
    pred = [np.mean([float(o["iou_predictions"].max()) for o in outs]) for outs in (fp1, fp2)]
    mag = [np.mean([float(np.abs(o["low_res_masks"]).mean()) for o in outs]) for outs in (fp1, fp2)]
    print(f"FP decoder, step 2 vs step 1: mask IoU mean {np.mean(overlap):.3f} (min {np.min(overlap):.3f}, max "
          f"{np.max(overlap):.3f}); predicted IoU mean {pred[0]:.3f} -> {pred[1]:.3f}; mean |logit| {mag[0]:.2f} -> "
          f"{mag[1]:.2f}", flush=True)
    rows = []
    for bits in a.bits:
        cfg = QuantConfig(bits=BitWidths.parse(bits), method=a.method, num_calib=a.num_calib)
        for refinement in (False, True):
            out = work / f"official.{bits}.{a.method}.{'mask01' if refinement else 'mask0'}.onnx"
            q = quantize_official(official, parts["encoder"], replace(cfg, calib_mask_input=refinement), out)
            n = a.num_calib * (2 if refinement else 1)
            s1, s2 = score(fp_sess, q, step1), score(fp_sess, q, step2)
            rows.append((bits, refinement, n, s1, s2))
            print(f"{bits} refinement={refinement}: {n} feeds; step 1 {s1[0]:.2f} dB IoU {s1[1]:.4f}; "
                  f"step 2 {s2[0]:.2f} dB IoU {s2[1]:.4f}", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    print(f"\n{datetime.date.today()}, commit {commit}, {a.model_type} model, {a.num_images} test images "
          f"({len(step1)} boxes, `data synth --seed 2`), --method {a.method}, {a.num_calib} calibration images\n")
    print("| setting | calibration feeds | step 1, no mask: SQNR dB | IoU | step 2, mask input: SQNR dB | IoU |")
    print("|---|---|---|---|---|---|")
    for bits, refinement, n, (s1, i1), (s2, i2) in rows:
        what = f"has_mask_input 0 and 1 ({n})" if refinement else f"has_mask_input 0 only ({n})"
        print(f"| {bits.upper()} {a.method.upper()} | {what} | {s1:.2f} | {i1:.4f} | {s2:.2f} | {i2:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
