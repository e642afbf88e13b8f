"""Peak resident memory and wall time of `carsam-onnx export` and `quantize` on the large SAM graphs (issue 14, item 4).

    python tools/bench_scale.py --work WORK vit_h:w8a8:4 vit_h:w4a16 vit_l:w8a8:4 vit_l:w4a16 vit_b:w8a8:4 vit_b:w8a8:32

Each job is MODEL:BITS[:NUM_CALIB] (MinMax calibration; W4A16 needs no activation statistics). The random-init
FP model of each type is exported once into WORK (kept for the next job; its export is measured too). Every command
runs as a child process; its peak resident set (the kernel's ru_maxrss of that child, from os.wait4) and wall time
are printed as one JSON line per command and appended to WORK/scale.jsonl. The quantized output is deleted after
each job (only its size is kept). Nothing is timed inside the process: the figures are the whole command's.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

CLI = [sys.executable, "-m", "carsam_onnx", "--quiet"]


def run_measured(cmd: list[str]) -> dict:
    """Wall seconds, peak RSS (GiB) and exit code of one child command."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    err = p.stderr.read().decode(errors="replace") if p.stderr else ""
    rc = os.waitstatus_to_exitcode(status)
    return {"wall_s": round(time.perf_counter() - t0, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "rc": rc, "stderr_tail": err.strip()[-300:] if rc else ""}


def files_size(path: Path) -> int:
    """Bytes of an ONNX file and its external-data files (same stem)."""
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*")) + \
        sum(p.stat().st_size for p in path.parent.glob(path.stem + ".data*"))


def host() -> str:
    flags = sorted({f for line in open("/proc/cpuinfo") if line.startswith("flags") for f in line.split()[2:]}
                   & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"})
    mem = next((int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0) / 2**20
    return f"{platform.machine()}, {os.cpu_count()} cores, {mem:.0f} GiB, flags {' '.join(flags)}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("jobs", nargs="+", help="MODEL:BITS[:NUM_CALIB], e.g. vit_h:w8a8:4")
    ap.add_argument("--work", required=True)
    a = ap.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "scale.jsonl"

    def record(row: dict) -> None:
        row.update(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), host=host(),
                   load_before=os.getloadavg()[0])
        print(json.dumps(row), flush=True)
        with open(log, "a") as f:
            f.write(json.dumps(row) + "\n")

    for job in a.jobs:
        model_type, bits, *rest = job.split(":")
        num_calib = int(rest[0]) if rest else 4
        fp = work / f"{model_type}.onnx"
        if not fp.is_file():
            cmd = CLI + ["export", "--model-type", model_type, "--random-init", "--seed", "0", "-o", str(fp)]
            row = {"step": "export", "model": model_type, **run_measured(cmd)}
            record({**row, "fp_bytes": files_size(fp) if fp.is_file() else None})
        out = work / f"{model_type}_{bits}_{num_calib}.onnx"
        cmd = CLI + ["quantize", str(fp), "-o", str(out), "--bits", bits, "--method", "minmax",
                     "--num-calib", str(num_calib), "--force"]
        row = {"step": "quantize", "model": model_type, "bits": bits, "num_calib": num_calib, **run_measured(cmd)}
        row["out_bytes"] = files_size(out) if out.is_file() else None
        record(row)
        for p in work.glob(out.name + "*"):
            p.unlink()
        for p in work.glob(out.stem + ".data*"):
            p.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
