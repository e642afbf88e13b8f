"""Wall time of `carsam-onnx quantize` (and where it goes), and eval throughput on a runtime/device.

    python tools/bench_quantize.py quantize --model-type vit_b --bits w8a8 --method minmax --num-calib 8 [--device cpu]
    python tools/bench_quantize.py eval --model-type vit_b --bits w4a4 --num-images 8 --runtime torch --device cuda

`quantize` times the whole CLI command in a child process (export excluded: it is done first). `eval` exports
the model (random init), quantizes it, writes a synthetic validation set, and reports images per second of
`carsam-onnx eval` for the FP and the quantized graph (encoder once per image, all prompts through the decoder).
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
    from carsam_onnx import api
    from carsam_onnx.data.builtin import VALIDATION_SEED
    from carsam_onnx.data.synth import write_synthetic_coco

    fp = export(tmp, a.model_type)
    q = tmp / "q.onnx"
    sh(CLI + ["quantize", str(fp), "-o", str(q), "--bits", a.bits, "--method", "minmax", "--num-calib", "4",
              "--device", a.device])
    val = tmp / "val"
    write_synthetic_coco(val, a.num_images, VALIDATION_SEED)
    row = {"what": "eval", "model": a.model_type, "runtime": a.runtime, "device": a.device,
           "num_images": a.num_images, "machine": machine(a.device)}
    for name, path in (("fp32", fp), (a.bits, q)):
        api.evaluate(path, dataset=val, runtime=a.runtime, device=a.device, progress=False, limit=2)  # warm-up
        t = time.perf_counter()
        r = api.evaluate(path, dataset=val, runtime=a.runtime, device=a.device, progress=False)
        secs = time.perf_counter() - t
        row[f"{name}_images_per_s"] = round(a.num_images / secs, 3)
        row[f"{name}_prompts"] = r.num_instances
        row[f"{name}_timings"] = r.timings
    return row


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
