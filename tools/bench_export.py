"""Export time / peak memory / file sizes for vit_b, vit_l, vit_h, and ORT CPU latency of encoder and decoder.

Usage: .venv/bin/python tools/bench_export.py [--model-types vit_b vit_l vit_h] [--runs 3] [--md docs/benchmarks.md]
Each export runs `carsam-onnx export --split` in a child process; peak memory is the child's max RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "carsam_onnx"]


def export_child(model_type: str, out: Path) -> tuple[float, float]:
    """Run the export in a fresh process; return (seconds, peak RSS GiB) of that process alone."""
    code = ("import resource,subprocess,sys,time,json;t=time.perf_counter();"
            "r=subprocess.run(sys.argv[1:]);"
            "print(json.dumps([time.perf_counter()-t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode]))")
    cmd = [sys.executable, "-c", code, *CLI, "-q", "export", "--model-type", model_type, "--random-init", "--seed", "0",
           "--split", "-o", str(out), "--force"]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    secs, rss_kb, rc = json.loads(res.stdout.strip().splitlines()[-1])
    if rc != 0:
        raise SystemExit(f"export failed: {res.stderr}")
    return secs, rss_kb / 2**20


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def latency(path: Path, feeds: dict, runs: int) -> float:
    so = ort.SessionOptions()
    so.intra_op_num_threads = os.cpu_count()
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    sess.run(None, feeds)  # warm-up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-types", nargs="+", default=["vit_b", "vit_l", "vit_h"])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--decoder-runs", type=int, default=20)
    ap.add_argument("--md", type=Path, help="append the table to this markdown file")
    args = ap.parse_args()
    rows = []
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(dir=ROOT / "artifacts" if (ROOT / "artifacts").is_dir() else None) as tmp:
        for mt in args.model_types:
            out = Path(tmp) / f"sam_{mt}.onnx"
            secs, rss = export_child(mt, out)
            enc, dec = out.with_name(f"sam_{mt}.encoder.onnx"), out.with_name(f"sam_{mt}.decoder.onnx")
            image = rng.standard_normal((1, 3, 1024, 1024), dtype=np.float32)
            emb = rng.standard_normal((1, 256, 64, 64), dtype=np.float32)
            box = {"point_coords": np.array([[[100, 200], [600, 900]]], np.float32),
                   "point_labels": np.array([[2, 3]], np.float32)}
            row = {"model": mt, "export_s": round(secs, 1), "peak_rss_gib": round(rss, 2),
                   "full_mb": round(size_of(out) / 1e6, 1), "encoder_mb": round(size_of(enc) / 1e6, 1),
                   "decoder_mb": round(size_of(dec) / 1e6, 2),
                   "encoder_ms": round(1e3 * latency(enc, {"image": image}, args.runs)),
                   "decoder_ms": round(1e3 * latency(dec, {"image_embeddings": emb, **box}, args.decoder_runs), 1)}
            print(json.dumps(row), flush=True)
            rows.append(row)
            for p in Path(tmp).iterdir():
                p.unlink()
    if args.md:
        cmd = "python tools/bench_export.py " + " ".join(sys.argv[1:])
        lines = [f"\n### Export and ORT CPU latency ({date.today()}, {platform.processor() or platform.machine()}, "
                 f"{os.cpu_count()} cores, onnxruntime {ort.__version__})\n",
                 f"Command: `{cmd}` (export = `carsam-onnx export --random-init --split`, dynamo exporter, "
                 "three models per run; latency = median of runs after one warm-up, "
                 f"encoder {args.runs} runs, decoder {args.decoder_runs} runs, box prompt)\n",
                 "| model | export (s) | peak RSS (GiB) | full (MB) | encoder (MB) | decoder (MB) "
                 "| encoder ORT (ms) | decoder ORT (ms) |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['model']} | {r['export_s']} | {r['peak_rss_gib']} | {r['full_mb']} | {r['encoder_mb']} | "
                         f"{r['decoder_mb']} | {r['encoder_ms']} | {r['decoder_ms']} |")
        with open(args.md, "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
