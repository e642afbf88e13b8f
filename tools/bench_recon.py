"""Acceptance matrix of block reconstruction (issue 11): recon vs the best calibrator-only baseline and FP.

    python tools/bench_recon.py [--device cpu|cuda] [--bits w6a6 w4a4 w3a3] [--calib-seeds 1 2 3]
        [--val-seeds 2 7] [--num-val 200] [--recon-iters N] [--baseline mse] [--work-dir DIR]
        [--out-md docs/results.md] [--limit N] [--table-only] [-q]

- FP model: the bundled reference model, exported once (tools/bench_accuracy.py's fp_model), or --model.
- Validation sets: synthetic, `--num-val` images of each validation seed (2 tunes, 7 only reports).
- Calibration: a pool of CALIB_POOL synthetic images of the calibration seed (1, disjoint from validation and
  training); calibration seed s draws `--num-calib` (32) images from it and seeds everything random in the
  method (sampling, QDrop masks), so the three seeds differ in images and in randomness.
- Cells: (method, bits, calibration seed) -> one quantized model (ours, `carsam_onnx.quantize`), scored by ONNX
  Runtime on every validation seed (`carsam_onnx.eval.runner.evaluate`). recon runs with --device's default
  schedule (ReconConfig.cpu_iters, cpu_iters_3bit at 3 bits, or gpu_iters) unless --recon-iters.
- Resumable: each (cell, validation seed) result is cached in WORK/cells/ with a fingerprint; a rerun skips it.
- Writes its section of --out-md between two marker comments (the rest of the file is left alone): command,
  date, machine, per validation seed the mean +- std over calibration seeds and the share of the gap closed,
  (recon - baseline) / (FP - baseline), and the quantization times.
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_accuracy import fp_model, git_commit, sha256_file, write_json_atomic, write_text_atomic  # noqa: E402

from carsam_onnx.config import BitWidths, QuantConfig, ReconConfig  # noqa: E402
from carsam_onnx.errors import CarsamError, OutputError  # noqa: E402

BEGIN = "<!-- tools/bench_recon.py writes from here -->"
END = "<!-- tools/bench_recon.py ends here -->"
CALIB_POOL = 96


def dataset(work: Path, seed: int, num: int) -> Path:
    from carsam_onnx.data.builtin import SYNTH_IMAGE_SIZE
    from carsam_onnx.data.synth import write_synthetic_coco

    out = work / f"synth_s{seed}_n{num}"
    if not (out / "annotations.json").is_file():
        write_synthetic_coco(out, num, seed, image_size=SYNTH_IMAGE_SIZE, force=True)
    return out


def evaluate(model: Path, val: Path, limit, progress: bool) -> dict:
    from carsam_onnx.eval.runner import evaluate as ev

    t0 = time.perf_counter()
    r = ev(model, val, limit=limit, runtime="ort", progress=progress)
    return {"segm_mAP": r.segm_mAP, "mIoU": r.mIoU, "num_images": r.num_images, "num_instances": r.num_instances,
            "eval_s": round(time.perf_counter() - t0, 1)}


def cached(path: Path, fpr: dict):
    if path.is_file():
        c = json.loads(path.read_text())
        if c.get("fingerprint") == fpr:
            return c["result"]
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--work-dir", default=str(ROOT / ".cache" / "bench_recon"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bits", nargs="+", default=["w6a6", "w4a4", "w3a3"])
    ap.add_argument("--calib-seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--val-seeds", nargs="+", type=int, default=[2, 7])
    ap.add_argument("--num-val", type=int, default=200)
    ap.add_argument("--num-calib", type=int, default=32)
    ap.add_argument("--limit", type=int, help="evaluate only the first N validation images (quick runs)")
    ap.add_argument("--recon-iters", type=int, help="steps per unit (default: the device's schedule)")
    ap.add_argument("--baseline", default="mse", help="calibrator-only baseline column (the best one: mse)")
    ap.add_argument("--out-md", default=str(ROOT / "docs" / "results.md"))
    ap.add_argument("--table-only", action="store_true", help="write the table from cached cells only")
    ap.add_argument("--only", nargs="+", choices=["fp", "baseline", "recon"], default=["fp", "baseline", "recon"],
                    help="compute only these columns (the others come from the cache when present): e.g. the "
                         "baseline cells on a CPU machine and the recon cells on a GPU one, same --work-dir")
    ap.add_argument("-q", "--quiet", action="store_true")
    a = ap.parse_args(argv)
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    def log(*x):
        print(*x, file=sys.stderr, flush=True)
    fp, fp_desc = fp_model(work, a.model, None)
    fp_hash = sha256_file(fp)[:16]
    rc = ReconConfig(iters=a.recon_iters)

    def steps(bits: str) -> int:   # steps per unit at these bits on this device (part of a recon cell's key)
        return rc.iters_for(a.device, BitWidths.parse(bits))
    vals = {s: dataset(work, s, a.num_val) for s in a.val_seeds}
    from carsam_onnx.data.builtin import CALIBRATION_SEED

    pool = dataset(work, CALIBRATION_SEED, CALIB_POOL)
    results: dict = {}

    def cell(method: str, bits: str | None, cseed: int | None):
        key = "fp" if method == "fp" else f"{method}{'_' + schedule(a, steps, bits) if method == 'recon' else ''}_{bits}_c{cseed}"
        todo = []
        for vs, val in vals.items():
            fpr = {"fp": fp_hash, "val": sha256_file(val / "annotations.json")[:16], "limit": a.limit, "key": key,
                   "num_calib": a.num_calib, "device": a.device if method == "recon" else None}
            path = work / "cells" / f"{key}_v{vs}.json"
            res = cached(path, fpr)
            if res is None:
                todo.append((vs, val, path, fpr))
            else:
                results[(key, vs)] = res
        col = "fp" if method == "fp" else ("recon" if method == "recon" else "baseline")
        if not todo or a.table_only or col not in a.only:
            return
        model, qinfo = fp, {}
        if method != "fp":
            model = work / f"{key}.onnx"
            from carsam_onnx.quantize import quantize

            cfg = QuantConfig(bits=BitWidths.parse(bits), method=method, num_calib=a.num_calib, seed=cseed,
                              device=a.device, recon=rc)
            t0 = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    rep = quantize(fp, model, cfg, calib_images=pool, force=True, progress=not a.quiet)
            except CarsamError as e:
                log(f"{key}: FAILED: {e}")
                return
            qinfo = {"quantize_s": round(time.perf_counter() - t0, 1),
                     "calibration_s": round(rep.seconds.get("calibration", 0.0), 1)}
            if rep.recon_units:
                qinfo["recon_steps"] = sum(u.iters for u in rep.recon_units)
                qinfo["recon_units"] = [{"unit": u.name, "kind": u.kind, "iters": u.iters, "s": round(u.seconds, 2),
                                         "loss_start": u.loss_start, "loss_end": u.loss_end}
                                        for u in rep.recon_units]
            log(f"{key}: quantized in {qinfo['quantize_s']:.0f} s")
        for vs, val, path, fpr in todo:
            r = {**evaluate(model, val, a.limit, not a.quiet), **qinfo, "commit": git_commit(),
                 "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
            write_json_atomic(path, {"fingerprint": fpr, "result": r})
            results[(key, vs)] = r
            log(f"{key} val{vs}: mAP {r['segm_mAP']:.2f}")
        if method != "fp":
            model.unlink(missing_ok=True)

    cell("fp", None, None)
    for bits in a.bits:
        for cs in a.calib_seeds:
            cell(a.baseline, bits, cs)
            cell("recon", bits, cs)
    write_section(Path(a.out_md), markdown(results, a, steps, fp_desc))
    return 0


def _stats(xs):
    if not xs:
        return None
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0), len(xs)


def schedule(a, steps, bits: str) -> str:
    """A recon cell's schedule key: device and steps per unit, e.g. cpu200."""
    return f"{'gpu' if a.device.startswith('cuda') else 'cpu'}{steps(bits)}"


def markdown(results, a, steps, fp_desc) -> str:
    import os

    flags = cpu_flags()
    cmd = "python tools/bench_recon.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    dev = "gpu" if a.device.startswith("cuda") else "cpu"
    per_bits = ", ".join(f"{b} {steps(b)}" for b in a.bits)
    lines = [f"## Block reconstruction (`--method recon`, issue 11): {dev} schedule", "",
             f"Made by `{cmd}` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC ({platform.machine()}, "
             f"{os.cpu_count()} CPU cores, {flags or 'no AVX2'}; device {a.device}).", "",
             f"- Model: {fp_desc}. Scores: ONNX Runtime (CPU) running the emitted Q/DQ ONNX, segm mAP over "
             f"{a.num_val if a.limit is None else a.limit} images per validation seed, ground-truth boxes.",
             f"- recon: steps per unit {per_bits} ({dev} schedule); {a.num_calib} calibration images drawn by each calibration "
             f"seed from a pool of {CALIB_POOL} (data seed 1); cells are mean +- std over calibration seeds "
             f"{', '.join(map(str, a.calib_seeds))} (n = seeds with a result).",
             "- Gap closed = (recon - baseline) / (FP - baseline), the baseline being the calibrator-only "
             f"`{a.baseline}` column of the same seeds. Seed 2 chose the defaults; seed 7 was never used to choose.", ""]
    for vs in a.val_seeds:
        fp = results.get(("fp", vs))
        fpv = fp["segm_mAP"] if fp else None
        lines += [f"### Validation seed {vs}" + (f" (FP {fpv:.2f})" if fpv is not None else ""), "",
                  f"| bits | {a.baseline} | recon ({dev}) | gap closed | recon quantize time (s) |",
                  "|---|---|---|---|---|"]
        for bits in a.bits:
            b = _stats([results[(f"{a.baseline}_{bits}_c{c}", vs)]["segm_mAP"] for c in a.calib_seeds
                        if (f"{a.baseline}_{bits}_c{c}", vs) in results])
            rkeys = [(f"recon_{schedule(a, steps, bits)}_{bits}_c{c}", vs) for c in a.calib_seeds]
            r = _stats([results[k]["segm_mAP"] for k in rkeys if k in results])
            times = [results[k].get("quantize_s") for k in rkeys if k in results and results[k].get("quantize_s")]
            fmt = lambda s: "–" if s is None else f"{s[0]:.2f} ± {s[1]:.2f} (n={s[2]})"  # noqa: E731
            gap = "–"
            if b and r and fpv is not None and fpv != b[0]:
                gap = f"{100 * (r[0] - b[0]) / (fpv - b[0]):.0f}%"
            lines.append(f"| {bits.upper()} | {fmt(b)} | {fmt(r)} | {gap} | "
                         f"{', '.join(f'{t:.0f}' for t in times) or '–'} |")
        lines.append("")
    return "\n".join(lines)


def cpu_flags() -> str:
    """The CPU flags that decide integer-kernel speed (VNNI, AVX-512, AMX), space-separated; "" if unknown."""
    try:
        cpu = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return ""
    return " ".join(sorted({f for f in cpu if f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")}))


def write_section(path: Path, section: str, begin: str = BEGIN, end: str = END) -> None:
    """Write `section` between the two marker comments of `path` (appended the first time), leaving the rest."""
    existing = path.read_text() if path.is_file() else ""
    block = f"{begin}\n{section.rstrip()}\n{end}"
    if begin in existing and end in existing:
        i, j = existing.index(begin), existing.index(end)
        if j < i:
            raise OutputError(f"{path}: markers {begin} / {end} out of order")
        text = existing[:i] + block + existing[j + len(end):]
    else:
        text = existing.rstrip("\n") + ("\n\n" if existing else "") + block + "\n"
    write_text_atomic(path, text)


if __name__ == "__main__":
    sys.exit(main())
