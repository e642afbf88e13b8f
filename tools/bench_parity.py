"""How closely runtimes agree on one model: COCO segm mAP of each against ONNX Runtime, and per prompt how far
their low-res masks are apart (IoU of the two masks) (a 4-bit activation one float ulp from a rounding tie lands on another code
in one runtime than in the other, and later layers carry that on).

    python tools/bench_parity.py MODEL.onnx --dataset VAL [--limit 80] [--variants ort torch-cpu torch-cuda ...]

Variants: ort (ONNX Runtime, CPU: the reference), torch-cpu, torch-cuda (the default: prompts vmapped, runs
replayed as CUDA graphs), torch-cuda-eager (vmapped, no graphs), torch-cuda-loop (prompt by prompt, no graphs).
Prints one JSON line per variant; --fp FP.onnx adds the FP image part's relative error on CUDA against the CPU
(about 1e-6 in IEEE float32; TF32 would show about 1e-3).

--draws K adds K-1 evaluations of each listed variant with N(0, --sigma) added to the normalised image (1e-4: far
below one grey level, 1/58): at 4-bit activations such a perturbation, like a change of runtime, moves codes that
sit within float rounding of a tie, and the moves spread through the later layers; the spread of the draws' mAP is
the noise floor of any runtime comparison on that set, and the draws' mean a comparison above it. Draw k adds the
noise of seed k in every runtime, so two runs with the same --draws are paired draw by draw. ORT is always
evaluated once (the reference of the mask comparison); it is drawn only when listed, so `--variants ort` and
`--variants torch-cuda` can run as two processes at once (the CPU and the GPU). Each draw prints a line as it ends;
`python tools/bench_parity.py --pair A.jsonl B.jsonl` reads two such outputs and prints the paired difference.
--ort-threads N sets ONNX Runtime's intra-op threads (default: one per core), on which a 4-bit model's score
depends: two runs at two counts, paired, compare ORT with itself; --ort-config KEY=VALUE adds a session config
entry to ort_settings' (e.g. session.disable_quant_qdq=1). Each variant's row holds `logits_sha256`, a
hash of its low-res logits on the compared images, equal where two runs computed the same masks bit for bit.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from carsam_onnx.data.coco import load_coco_dataset
from carsam_onnx.deploy.engines import build_predictor
from carsam_onnx.deploy.predictor import SamOnnxPredictor
from carsam_onnx.eval.noise import image_part_error, perturbed_maps
from carsam_onnx.eval.runner import evaluate, select_prompts
from carsam_onnx.runtime import OrtRuntime
from carsam_onnx.runtime.ort_settings import host_isa_flags

VARIANTS = {"ort": ("ort", {}), "torch-cpu": ("torch", {"device": "cpu"}),
            "torch-cuda": ("torch", {"device": "cuda"}),
            "torch-cuda-eager": ("torch", {"device": "cuda", "cuda_graphs": False}),
            "torch-cuda-loop": ("torch", {"device": "cuda", "cuda_graphs": False, "batch_prompts": False})}


def runtime(variant: str, ort_threads: int | None = None, ort_config: dict | None = None):
    kind, kw = VARIANTS[variant]
    if kind == "ort":
        return OrtRuntime(threads=ort_threads, extra_config=ort_config)
    from carsam_onnx.runtime.torch_runtime import TorchRuntime

    return TorchRuntime(**kw)


def logits(model: Path, dataset, by_image: dict, rt) -> dict[int, np.ndarray]:
    pred = SamOnnxPredictor.from_engine(build_predictor(model, rt))
    out = {}
    for image_id in sorted(by_image):
        pred.set_image(dataset.read_image(image_id))
        out[image_id] = pred.predict(boxes=np.array([p.box_xyxy for p in by_image[image_id]])).low_res_logits
    return out


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per prompt IoU of two boolean low-res masks [k, s, s] (1 where both are empty)."""
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    inter, union = (a & b).sum(1), (a | b).sum(1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def paired(a_path: Path, b_path: Path) -> dict:
    """B - A over the draws both outputs hold (one variant each): mean, sd, standard error, correlation."""
    draws = []
    for path in (a_path, b_path):
        rows = [r for r in map(json.loads, path.read_text().splitlines()) if "draw" in r]   # per-draw lines only
        if len({r["variant"] for r in rows}) != 1:
            raise ValueError(f"{path} must hold the draws of exactly one variant")
        draws.append((rows[0]["variant"], {r["draw"]: r["segm_mAP"] for r in rows}))
    (va, a), (vb, b) = draws
    ks = sorted(set(a) & set(b))
    if len(ks) < 2:
        raise ValueError("fewer than 2 draws in common")
    x, y = np.array([a[k] for k in ks]), np.array([b[k] for k in ks])
    d = y - x
    return {"pair": f"{vb} - {va}", "draws": len(ks), "mean": round(float(d.mean()), 3),
            "sd": round(float(d.std(ddof=1)), 3), "se": round(float(d.std(ddof=1) / np.sqrt(len(ks))), 3),
            "within_0.2": f"{int((abs(d) <= 0.2).sum())}/{len(ks)}", "corr": round(float(np.corrcoef(x, y)[0, 1]), 2),
            f"{va}_mean": round(float(x.mean()), 3), f"{vb}_mean": round(float(y.mean()), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, nargs="?")
    ap.add_argument("--pair", type=Path, nargs=2, metavar=("A.jsonl", "B.jsonl"),
                    help="print B - A, paired by draw, from two outputs of this tool; nothing is evaluated")
    ap.add_argument("--dataset", type=Path)
    ap.add_argument("--limit", type=int, default=80)
    ap.add_argument("--logit-images", type=int, default=20, help="images whose logits are compared")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--draws", type=int, default=1, help="evaluations per variant (1 unperturbed + perturbed ones)")
    ap.add_argument("--sigma", type=float, default=1e-4, help="std of the perturbation of the normalised image")
    ap.add_argument("--fp", type=Path, help="the FP model: report CUDA's float32 error on its image part")
    ap.add_argument("--ort-threads", type=int, help="ONNX Runtime's intra-op threads (default: one per core)")
    ap.add_argument("--ort-config", nargs="+", default=[], metavar="KEY=VALUE",
                    help="session config entries added to ort_settings' for ORT (e.g. session.disable_quant_qdq=1)")
    a = ap.parse_args()
    if a.pair:
        try:
            print(json.dumps(paired(*a.pair)))
        except (OSError, ValueError, KeyError) as e:
            ap.error(f"--pair: {e}")
        return
    if a.model is None or a.dataset is None:
        ap.error("a model and --dataset are required (or --pair A.jsonl B.jsonl)")
    if any("=" not in kv for kv in a.ort_config):
        ap.error("--ort-config takes KEY=VALUE entries")
    ort_config = dict(kv.split("=", 1) for kv in a.ort_config)
    warnings.simplefilter("ignore")
    dataset = load_coco_dataset(a.dataset)
    by_image, _, _ = select_prompts(dataset, "gt", a.limit)
    some = {i: by_image[i] for i in sorted(by_image)[:a.logit_images]}
    ref_logits, ref_map = None, None
    for v in ["ort"] + [v for v in a.variants if v != "ort"]:
        t = time.perf_counter()
        rt = runtime(v, a.ort_threads, ort_config)
        r = evaluate(a.model, dataset, limit=a.limit, runtime=rt, progress=False)
        secs = time.perf_counter() - t
        lg = logits(a.model, dataset, some, rt)
        row = {"variant": v, "segm_mAP": round(r.segm_mAP, 3), "mIoU": round(r.mIoU, 5), "eval_s": round(secs, 1),
               "logits_sha256": hashlib.sha256(b"".join(lg[i].tobytes() for i in sorted(lg))).hexdigest()[:16]}
        if a.draws > 1 and v in a.variants:
            def show(k, m, v=v):
                print(json.dumps({"variant": v, "draw": k, "segm_mAP": round(m, 3)}), flush=True)
            maps = perturbed_maps(a.model, dataset, rt, a.draws, a.sigma, a.limit, show)   # draw 0: r's score again
            row.update(draws=[round(m, 3) for m in maps], draws_mean=round(float(np.mean(maps)), 3),
                       draws_std=round(float(np.std(maps, ddof=1)), 3))
        if ref_logits is None:
            ref_logits, ref_map = lg, r.segm_mAP
            row.update(cpu_flags=host_isa_flags(), ort_threads=a.ort_threads, ort_config=ort_config)
        else:
            iou = np.concatenate([mask_iou(lg[i] > 0, ref_logits[i] > 0) for i in some])
            diff = [float(np.abs(lg[i] - ref_logits[i]).max()) for i in some]
            row.update(dmAP_vs_ort=round(r.segm_mAP - ref_map, 3), prompts=len(iou),
                       mask_iou_vs_ort_mean=round(float(iou.mean()), 5), mask_iou_vs_ort_min=round(float(iou.min()), 4),
                       prompts_iou_below_099=int((iou < 0.99).sum()),
                       images_logits_equal=f"{sum(d < 1e-3 for d in diff)}/{len(diff)}")
        print(json.dumps(row), flush=True)
    if a.fp is not None:
        err = image_part_error(a.fp, dataset.read_image(dataset.image_ids[0]))
        print(json.dumps({"fp_image_part_rel_error_cuda_vs_cpu": err}), flush=True)
    print(json.dumps({"command": "python tools/bench_parity.py " + " ".join(sys.argv[1:])}))


if __name__ == "__main__":
    main()
