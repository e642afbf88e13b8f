"""Deployment size and ONNX Runtime CPU latency of SAM's encoder and decoder: FP32 vs W8A8 vs W4A16 (vs W4A4).

    # sizes: export + quantize the parts, compare file sizes with params x bits / 8
    python tools/bench_deploy.py sizes --workdir WORK --model-type reference [--bits w8a8 w4a16 w4a4]
    # latency (run on a quiet machine): encoder per image, decoder per prompt, over ORT configurations
    python tools/bench_deploy.py latency --workdir WORK --model-type reference [--threads 1 4 16] [--repeats 20]

Both print markdown rows with the date, the commit and the CPU's flags (VNNI, AVX-512, AMX). The models are
quantized once into WORK (built-in calibration set, MinMax, `--target ort`) and reused by later runs; `--model-type
vit_b` uses random weights (sizes and speed do not depend on the values).

ORT configurations timed for each model: graph optimisation level (basic / extended / all), intra-op threads
(`--threads`), and for the Q/DQ models the session options eval sets (runtime/ort_settings.py: MatMulNBits accuracy
level 0 and WeightBiasQuantization off, what the Q/DQ graph says; MatMulAddFusion off, so that quantized Linear
layers reach the integer kernels) against ORT's defaults.
Sequential execution, arena off as in eval; 3 warm-up runs, then the median of `--repeats` runs.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402

from carsam_onnx import api  # noqa: E402
from carsam_onnx.config import BitWidths, ExportConfig, QuantConfig  # noqa: E402
from carsam_onnx.runtime.ort_settings import SESSION_CONFIG  # noqa: E402

PARTS = ("encoder", "decoder")
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def cpu_line() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "CPU unknown"
    model = re.search(r"model name\s*:\s*(.+)", info)
    flags = sorted({f for f in FLAGS if re.search(rf"\b{f}\b", info)})
    return (f"{model.group(1).strip() if model else 'CPU'}, {os.cpu_count()} logical cores, "
            f"flags: {' '.join(flags) or 'none of ' + ' '.join(FLAGS)}")


def provenance() -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    return f"{datetime.date.today()}, commit {commit}, {cpu_line()}"


def models(work: Path, model_type: str, bits: list[str], method: str, num_calib: int = 32
           ) -> dict[tuple[str, str], Path]:
    """(part, setting) -> path; exports and quantizes what is missing."""
    work.mkdir(parents=True, exist_ok=True)
    parts = api.split_paths(work / f"{model_type}.onnx")
    if not all(parts[p].exists() for p in PARTS):
        seed = None if model_type == "reference" else 0
        api.export(parts["full"], ExportConfig(model_type=model_type, seed=seed, split=True, force=True))
    out = {(p, "fp32"): parts[p] for p in PARTS}
    for b in bits:
        for p in PARTS:
            q = work / f"{model_type}.{p}.{b}.onnx"
            if not q.exists():
                kw = {"encoder": parts["encoder"]} if p == "decoder" else {}
                api.quantize(parts[p], q, QuantConfig(bits=BitWidths.parse(b), method=method, num_calib=num_calib),
                             force=True,
                             progress=False, **kw)
            out[(p, b)] = q
    return out


def params(path: Path) -> tuple[int, int]:
    """(weight-layer parameters, all float initializer parameters) of an FP model."""
    m = onnx.load(str(path))
    from carsam_onnx.passes.plan import plan_quantization

    plan = plan_quantization(m, QuantConfig(keep_float=()))
    inits = {t.name: t for t in m.graph.initializer}
    layer = sum(int(np.prod(inits[w.initializer].dims)) for w in plan.weights if w.initializer in inits
                and w.kind.value != "constant")
    total = sum(int(np.prod(t.dims)) for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    return layer, total


def stored_ideal(path: Path) -> int:
    """Bytes the initializers need at their element type (INT4 half a byte): the file's floor."""
    m = onnx.load(str(path))
    per = {onnx.TensorProto.INT4: 0.5, onnx.TensorProto.UINT4: 0.5, onnx.TensorProto.INT8: 1,
           onnx.TensorProto.UINT8: 1, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.INT64: 8}
    return int(sum(int(np.prod(t.dims)) * per.get(t.data_type, 4) for t in m.graph.initializer))


def sizes(a) -> None:
    ms = models(Path(a.workdir), a.model_type, a.bits, a.method, a.num_calib)
    print(f"\n{provenance()}\n")
    print("| part | setting | file (MB) | x FP32 | params x bits / 8 (MB), all weights | file / that | "
          "initializers at their stored types (MB; kept-float layers in FP32) | file / that |")
    print("|---|---|---|---|---|---|---|---|")
    for p in PARTS:
        layer, total = params(ms[(p, "fp32")])
        fp = ms[(p, "fp32")].stat().st_size
        for setting in ["fp32", *a.bits]:
            size = ms[(p, setting)].stat().st_size
            wbits = 32 if setting == "fp32" else BitWidths.parse(setting).weight
            ideal = total * wbits / 8
            print(f"| {p} | {setting.upper()} | {size / 1e6:.2f} | {size / fp:.3f} | {ideal / 1e6:.2f} "
                  f"({total / 1e6:.2f} M params; {layer / 1e6:.2f} M in weight layers) | {size / ideal:.2f} | "
                  f"{stored_ideal(ms[(p, setting)]) / 1e6:.2f} | {size / stored_ideal(ms[(p, setting)]):.2f} |")


def _feeds(path: Path, part: str, size: int, rng) -> dict:
    if part == "encoder":
        return {"image": rng.normal(size=(1, 3, size, size)).astype(np.float32)}
    return {"image_embeddings": rng.normal(size=(1, 256, size // 16, size // 16)).astype(np.float32),
            "point_coords": rng.uniform(0, size, (1, 2, 2)).astype(np.float32),
            "point_labels": np.array([[2.0, 3.0]], np.float32)}


def latency(a) -> None:
    import onnxruntime as ort

    from carsam_onnx.calib.feeds import image_size

    ms = models(Path(a.workdir), a.model_type, a.bits, a.method, a.num_calib)
    size = image_size(onnx.load(str(ms[("encoder", "fp32")]), load_external_data=False))
    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    print(f"\n{provenance()}, onnxruntime {ort.__version__}, {a.repeats} runs (median)\n")
    print("| part | setting | opt level | threads | session options | median ms | x FP32 best |")
    print("|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for p in PARTS:
        feed = _feeds(ms[(p, "fp32")], p, size, rng)
        best_fp = None
        for setting in ["fp32", *a.bits]:
            rows = []
            exact_opts = (True,) if setting == "fp32" else (True, False)
            for level in a.levels:
                for threads in a.threads:
                    for exact in exact_opts:
                        so = ort.SessionOptions()
                        so.graph_optimization_level = levels[level]
                        so.intra_op_num_threads = threads
                        so.enable_cpu_mem_arena = False
                        so.log_severity_level = 3
                        kw = {}
                        if exact:
                            for key, value in SESSION_CONFIG.items():
                                so.add_session_config_entry(key, value)
                        sess = ort.InferenceSession(str(ms[(p, setting)]), so, providers=["CPUExecutionProvider"],
                                                    **kw)
                        for _ in range(3):
                            sess.run(None, feed)
                        times = []
                        for _ in range(a.repeats):
                            t0 = time.perf_counter()
                            sess.run(None, feed)
                            times.append(time.perf_counter() - t0)
                        rows.append((level, threads, exact, statistics.median(times) * 1e3))
            best = min(r[3] for r in rows)
            if setting == "fp32":
                best_fp = best
            for level, threads, exact, ms_ in rows:
                mark = " **fastest**" if ms_ == best else ""
                sem = "-" if setting == "fp32" else ("project's (ort_settings)" if exact else "ORT defaults")
                print(f"| {p} | {setting.upper()} | {level} | {threads} | {sem} | {ms_:.1f}{mark} | "
                      f"{best_fp / ms_:.2f}x |", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["sizes", "latency"])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--model-type", default="reference", help="reference | vit_b (random weights) | ...")
    ap.add_argument("--bits", nargs="+", default=None, help="default: sizes w8a8 w4a16 w4a4; latency w8a8 w4a16")
    ap.add_argument("--method", default="minmax")
    ap.add_argument("--threads", nargs="+", type=int, default=None, help="intra-op threads (default 1 and all)")
    ap.add_argument("--levels", nargs="+", default=["basic", "extended", "all"])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--num-calib", type=int, default=32, help="calibration images (sizes do not depend on them)")
    a = ap.parse_args()
    if a.bits is None:
        a.bits = ["w8a8", "w4a16", "w4a4"] if a.what == "sizes" else ["w8a8", "w4a16"]
    if a.threads is None:
        a.threads = sorted({1, os.cpu_count() or 1})
    (sizes if a.what == "sizes" else latency)(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
