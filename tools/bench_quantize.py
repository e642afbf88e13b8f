"""Wall time of `carsam-onnx quantize` (and where it goes), and eval throughput on a runtime/device.

    python tools/bench_quantize.py quantize --model-type vit_b --bits w8a8 --method minmax --num-calib 8 [--device cpu]
    python tools/bench_quantize.py eval --model-type vit_b --bits w4a4 --num-images 8 --runtime torch --device cuda
    python tools/bench_quantize.py eval ... --runtime torch --device cuda --cuda-graphs on off [--fp FP.onnx] [--profile]

`quantize` times the whole CLI command in a child process (export excluded: it is done first). `eval` exports
the model (random init), quantizes it, writes a synthetic validation set, and reports images per second of
`carsam-onnx eval` for the FP and the quantized graph (encoder once per image, all prompts through the decoder;
images per second of the evaluation loop after loading and 2 warm-up images, which a 5,000-image run amortises);
with --cuda-graphs, for the torch runtime with its CUDA graph replays on and/or off (runtime/cuda_graphs.py);
--fp reuses an exported FP model; --profile prints where the last variant's evaluation spends its time.
Both print one JSON line and can append a markdown row (--md).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

CLI = [sys.executable, "-m", "carsam_onnx", "-q"]


def sh(args: list[str]) -> tuple[float, str]:
    t = time.perf_counter()
    res = subprocess.run(args, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"failed: {' '.join(args)}\n{res.stderr[-2000:]}")
    return time.perf_counter() - t, res.stdout


def machine(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    from carsam_onnx.runtime.ort_settings import host_isa_flags

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU flags: {host_isa_flags()}"


def export(tmp: Path, model_type: str) -> Path:
    fp = tmp / f"{model_type}.onnx"
    sh(CLI + ["export", "--model-type", model_type, "--random-init", "--seed", "0", "-o", str(fp)])
    return fp


def bench_quantize(a, tmp: Path) -> dict:
    fp = export(tmp, a.model_type)
    out = tmp / "q.onnx"
    cmd = [c for c in CLI if c != "-q"] + ["quantize", str(fp), "-o", str(out), "--bits", a.bits, "--method",
                                           a.method, "--num-calib", str(a.num_calib), "--device", a.device]
    secs, stdout = sh(cmd)
    summary = [line for line in stdout.splitlines() if line.startswith(("output SQNR", "size:", "time:"))]
    return {"what": "quantize", "model": a.model_type, "bits": a.bits, "method": a.method,
            "num_calib": a.num_calib, "device": a.device, "wall_s": round(secs, 1), "summary": summary,
            "machine": machine(a.device)}


def bench_eval(a, tmp: Path) -> dict:
    from carsam_onnx.data.builtin import VALIDATION_SEED
    from carsam_onnx.data.coco import load_coco_dataset
    from carsam_onnx.deploy.engines import build_predictor
    from carsam_onnx.deploy.predictor import SamOnnxPredictor
    from carsam_onnx.eval.metrics import segm_metrics
    from carsam_onnx.eval.runner import timing_summary, run_predictions, select_prompts
    from carsam_onnx.data.synth import write_synthetic_coco
    from carsam_onnx.runtime import get_runtime

    fp = a.fp or export(tmp, a.model_type)
    q = a.qdq or tmp / "q.onnx"
    if not q.exists():
        sh(CLI + ["quantize", str(fp), "-o", str(q), "--bits", a.bits, "--method", "minmax", "--num-calib", "4",
                  "--device", a.device])
    val = tmp / "val"
    write_synthetic_coco(val, a.num_images, VALIDATION_SEED, image_size=a.image_size)
    row = {"what": "eval", "model": a.model_type, "runtime": a.runtime, "device": a.device,
           "num_images": a.num_images, "image_px": a.image_size, "machine": machine(a.device)}
    variants = a.cuda_graphs or [""]
    by_image, ids, _ = select_prompts(load_coco_dataset(val), "gt", None)
    dataset = load_coco_dataset(val)
    for name, path in (("fp32", fp), (a.bits, q)):
        for tag in variants:
            key = f"{name}_graphs_{tag}" if tag else name
            ips = []
            for _ in range(a.repeats):   # each repeat loads the model and warms up (captures) on 2 images
                t = time.perf_counter()
                rt = _runtime(a, tag) if tag else get_runtime(a.runtime, a.device)
                pred = SamOnnxPredictor.from_engine(build_predictor(path, rt))
                run_predictions(pred, dataset, {i: by_image[i] for i in ids[:2]}, progress=False)
                setup = time.perf_counter() - t
                prof = _profiler(a.profile and name != "fp32" and tag == variants[-1])
                t = time.perf_counter()
                preds, per_image = run_predictions(pred, dataset, by_image, progress=False)
                secs = time.perf_counter() - t
                _report(prof, key)
                ips.append(round(len(ids) / secs, 3))
            row[f"{key}_images_per_s"] = sorted(ips)[len(ips) // 2]
            row[f"{key}_images_per_s_all"] = ips
            row[f"{key}_load_and_warmup_s"] = round(setup, 1)
            row[f"{key}_segm_mAP"] = round(segm_metrics(dataset, preds, ids)["segm_mAP"], 3)
            row[f"{key}_prompts"] = len(preds)
            row[f"{key}_timings"] = timing_summary(per_image, secs)
    return row


def _runtime(a, graphs: str):
    from carsam_onnx.runtime.torch_runtime import TorchRuntime

    if a.runtime != "torch":
        raise SystemExit("--cuda-graphs is for --runtime torch")
    return TorchRuntime(a.device, cuda_graphs=graphs == "on")


def _profiler(on: bool):
    if not on:
        return None
    import cProfile

    prof = cProfile.Profile()
    prof.enable()
    return prof


def _report(prof, key: str) -> None:
    if prof is None:
        return
    import io
    import pstats

    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(35)
    print(f"== profile of {key}\n" + buf.getvalue(), file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["quantize", "eval"])
    ap.add_argument("--model-type", default="vit_b")
    ap.add_argument("--bits", default="w8a8")
    ap.add_argument("--method", default="minmax")
    ap.add_argument("--num-calib", type=int, default=8)
    ap.add_argument("--num-images", type=int, default=8)
    ap.add_argument("--runtime", default="ort")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--md", type=Path)
    ap.add_argument("--fp", type=Path, help="eval: an exported FP model to use instead of exporting one")
    ap.add_argument("--qdq", type=Path, help="eval: the quantized model (MinMax, 4 images) is kept there and reused")
    ap.add_argument("--image-size", type=int, default=256, help="eval: synthetic image side in pixels")
    ap.add_argument("--cuda-graphs", nargs="+", choices=["on", "off"], help="eval, torch runtime: graph replays")
    ap.add_argument("--repeats", type=int, default=1, help="eval: timed runs per variant (the median is reported)")
    ap.add_argument("--profile", action="store_true", help="eval: cProfile the last variant on the quantized model")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        row = (bench_quantize if a.what == "quantize" else bench_eval)(a, Path(tmp))
    row["date"] = str(date.today())
    row["command"] = "python tools/bench_quantize.py " + " ".join(sys.argv[1:])
    print(json.dumps(row), flush=True)
    if a.md:
        with open(a.md, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
