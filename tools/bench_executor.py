"""Torch executor overhead: SAM image encoder forward, segment-anything eager vs OnnxModule on the
exported ONNX graph, same weights, device, threads and input; medians of interleaved runs, ratio from
the same process.

    .venv/bin/python tools/bench_executor.py --model-type vit_b --exporter dynamo --runs 3
    .venv/bin/python tools/bench_executor.py --device cuda --exporter dynamo torchscript --runs 20 --write docs/benchmarks.md

Prints one JSON line per exporter; --write appends a markdown row (command, machine, date, figures).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from carsam_onnx.torchexec.module import OnnxModule  # noqa: E402
from carsam_onnx.export.models import build_sam  # noqa: E402
from carsam_onnx.export.onnx_export import export_onnx, module_for  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def bench(model_type: str, exporter: str, device: torch.device, runs: int, onnx_path: str | None) -> dict:
    built = build_sam(model_type, seed=0)
    if onnx_path:
        import onnx
        model = onnx.load(onnx_path)
    else:  # export on the CPU, before the eager module moves to the device
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = export_onnx(built, part="encoder", exporter=exporter)
    eager = module_for(built, "encoder", False).to(device)
    t0 = time.perf_counter()
    ex = OnnxModule(model).to(device)
    build_s = time.perf_counter() - t0
    del model
    size = built.sam.image_encoder.img_size
    image = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.inference_mode():
        ref = eager(image)
        first = _time(lambda: ex(image=image), device)  # first run of a plan computes its static values
        got = ex(image=image)["image_embeddings"]
        diff = float((got - ref).abs().max() / ref.abs().max())
        t_eager, t_ex = [], []
        for _ in range(runs):  # interleaved, so load changes hit both alike
            t_eager.append(_time(lambda: eager(image), device))
            t_ex.append(_time(lambda: ex(image=image), device))
    me, mx = statistics.median(t_eager), statistics.median(t_ex)
    nodes = len(ex._nodes)
    plan = next(iter(ex._plans.values()))
    return {"model_type": model_type, "exporter": exporter, "device": str(device), "runs": runs,
            "eager_s": round(me, 5), "executor_s": round(mx, 5), "ratio": round(mx / me, 3),
            "first_run_s": round(first, 4), "build_s": round(build_s, 2), "nodes": nodes,
            "nodes_run": len(plan.fast_steps or plan.steps), "max_rel_diff": diff,
            "eager_all_s": [round(t, 5) for t in t_eager], "executor_all_s": [round(t, 5) for t in t_ex],
            "machine": machine(device)}


def markdown_row(r: dict, command: str) -> str:
    unit, k = ("ms", 1000) if r["device"].startswith("cuda") else ("s", 1)
    return (f"| {r['model_type']} encoder, {r['exporter']} ({r['nodes']} nodes, {r['nodes_run']} run) | {r['device']} | "
            f"{r['eager_s'] * k:.3g} {unit} | {r['executor_s'] * k:.3g} {unit} | **{r['ratio']:.3f}x** | "
            f"{r['max_rel_diff']:.1e} | {r['runs']} | {r['machine']} | {datetime.date.today()} | `{command}` |")


HEADER = ("| graph | device | eager (median) | executor (median) | executor / eager | max rel. diff | runs | machine "
          "| date | command |\n|---|---|---|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-type", default="vit_b")
    ap.add_argument("--exporter", nargs="+", default=["dynamo"], choices=["dynamo", "torchscript"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--onnx", default=None, help="an exported encoder of the same random-init weights (seed 0) "
                                                 "instead of exporting here (one exporter only)")
    ap.add_argument("--write", default=None, help="append markdown rows to this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    command = "python tools/bench_executor.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows = []
    for exporter in args.exporter:
        r = bench(args.model_type, exporter, device, args.runs, args.onnx)
        print(json.dumps(r), flush=True)
        rows.append(markdown_row(r, command))
    if args.write:
        path = Path(args.write)
        text = path.read_text() if path.exists() else ""
        if HEADER.splitlines()[0] not in text:
            text += ("\n" if text else "") + HEADER + "\n"
        path.write_text(text + "\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
