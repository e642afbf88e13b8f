"""CAR-SAM ablation (issue 12) and reconstruction matrix (issue 11): variants x bits x calibration seeds, scored by
ONNX Runtime on the validation seeds, quantization and evaluation each run as parallel processes.

    python tools/bench_carsam.py --device cuda --bits w6a6 w4a4 w3a3 --calib-seeds 1 2 3 \
        --variants mse recon recon+mac recon+jcar carsam --jobs 3 --eval-jobs 4 --eval-threads 2

- Variants: `mse` (the calibrator-only baseline of the gap), `mse+smooth` (MSE with the scale migration at
  config.SMOOTH_ALPHA; calibration only too; the better baseline since the migration), `recon` (--method recon),
  `recon+mac` (carsam --no-jcar), `recon+jcar` (carsam --no-mac), `carsam` (both). `--jcar-pairing` and
  `--recon-iters` pass through; a non-default one is part of the cell key.
- FP model, validation sets and the calibration pool as in tools/bench_recon.py (reference model; calibration seed
  s draws --num-calib images from a pool of data seed 1 and seeds everything random in the method).
- Phase 1 quantizes every missing cell with `carsam-onnx quantize` processes (--jobs at once; on one GPU they
  share it). Phase 2 evaluates every (cell, validation seed) in a process pool (--eval-jobs processes, ONNX
  Runtime with --eval-threads threads each). The quantize processes share the cores left over (--cores minus
  the evaluations' threads; OMP_NUM_THREADS): at torch's defaults they spin against each other. Results are
  cached per (cell, validation seed) in WORK/cells/ with a fingerprint, so a rerun (or a second machine with the
  same --work-dir) only does what is missing; `--table-only` writes the section from the cache. Quantized
  models are kept in WORK/models/. A reconstruction cell's fingerprint and its model carry a digest of the
  method's defaults (config.py), so cells made before a default changed are made again, not read back. Several
  bench runs sharing a work dir each evaluate the FP model unless its cells exist: score it once first
  (`--fp-only --val-seeds ...`).
- Writes its section of --out-md between two marker comments: per validation seed and bit width, mean +- std
  over calibration seeds per variant, the share of the gap closed against the baseline, (v - mse) / (FP - mse),
  and the share of FP kept.
"""
from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_accuracy import fp_model, git_commit, sha256_file, write_json_atomic  # noqa: E402
from carsam_onnx.config import (JCAR_PAIRINGS, SMOOTH_ALPHA, SMOOTH_METHODS, CarsamConfig, MacConfig,  # noqa: E402
                                QuantConfig, ReconConfig)

from bench_recon import CALIB_POOL, _stats, cached, cpu_flags, dataset, write_section  # noqa: E402

BEGIN = "<!-- tools/bench_carsam.py writes from here -->"
END = "<!-- tools/bench_carsam.py ends here -->"
VARIANTS = {   # name -> quantize arguments
    "mse": ["--method", "mse"],
    "mse+smooth": ["--method", "mse", "--smooth", f"{SMOOTH_ALPHA:g}"],   # calibrator only, the default migration
    "recon": ["--method", "recon"],
    "recon+mac": ["--method", "carsam", "--no-jcar"],
    "recon+jcar": ["--method", "carsam", "--no-mac"],
    "carsam": ["--method", "carsam"],
}
CALIBRATORS = ("mse", "mse+smooth")   # calibrator-only cells: on the CPU, shared by every run (no tag, no pass-through)


def method_defaults() -> str:
    """A digest of the method's defaults (ReconConfig, MacConfig, CarsamConfig, the scale migration): part of a
    reconstruction cell's fingerprint and kept beside its model, so that a cell or model made under other defaults
    (e.g. MAC's lambda before the ninth GPU round) is made again instead of being read back under the same key."""
    text = repr([sorted(asdict(c()).items()) for c in (ReconConfig, MacConfig, CarsamConfig)])
    text += repr((QuantConfig().smooth, SMOOTH_ALPHA, SMOOTH_METHODS))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cell_key(variant: str, bits: str, cseed: int, a) -> str:
    key = f"{variant}_{bits}_c{cseed}"
    if variant not in CALIBRATORS:
        key += f"_{'gpu' if a.device.startswith('cuda') else 'cpu'}"
        if a.recon_iters:
            key += f"_it{a.recon_iters}"
        if "jcar" in variant or variant == "carsam":
            key += f"_{a.jcar_pairing}"
        if a.tag:
            key += f"_{a.tag}"
    return key


def quantize_cmd(fp: Path, out: Path, variant: str, bits: str, cseed: int, pool: Path, a) -> list[str]:
    cmd = [sys.executable, "-m", "carsam_onnx", "quantize", str(fp), "-o", str(out), "--bits", bits,
           *VARIANTS[variant], "--calib-images", str(pool), "--num-calib", str(a.num_calib), "--seed", str(cseed),
           "--device", a.device if variant not in CALIBRATORS else "cpu", "--force"]
    if variant not in CALIBRATORS:
        if a.recon_iters:
            cmd += ["--recon-iters", str(a.recon_iters)]
        cmd += ["--jcar-pairing", a.jcar_pairing, *shlex.split(a.quantize_args or "")]
    return cmd


def _eval_worker_init(threads: int) -> None:
    """Evaluation workers yield the CPU to the quantize processes (on a GPU, reconstruction is bound by one
    Python thread launching kernels: GPU 11-17% busy while other jobs loaded the CPU; docs/results.md), and
    keep torch to their share of the cores."""
    os.nice(10)
    import torch

    torch.set_num_threads(threads)


def thread_budget(cores: int, jobs: int, eval_jobs: int, eval_threads: int) -> tuple[int, int]:
    """(threads per quantize process, threads per evaluation process) so that all of them together use at most
    `cores`. Every process left at torch's default (one thread per core) spins OpenMP threads against the
    others: on the 16-core device machine, 3 quantize and 5 evaluation processes at their defaults (load 81)
    made a 200-image evaluation take 1,092 s and left the GPU idle for 20 minutes (docs/results.md)."""
    ev = max(1, eval_threads or 1)
    left = max(1, cores - eval_jobs * ev)
    return max(1, left // max(1, jobs)), ev


def queue_order(variants: list[str], bits: list[str], seeds: list[int], order: str) -> list[tuple]:
    """(variant, bits, calibration seed) cells in the order they are quantized; seeds always innermost, so a
    cut-short run leaves whole mean +- std cells rather than one seed of each."""
    if order == "variant":
        return [(v, b, c) for v in variants for b in bits for c in seeds]
    return [(v, b, c) for b in bits for v in variants for c in seeds]


def _evaluate(model: str, val: str, threads: int, limit) -> dict:
    import warnings

    from carsam_onnx.eval.runner import evaluate
    from carsam_onnx.runtime.ort import OrtRuntime

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = evaluate(model, val, runtime=OrtRuntime(threads=threads), limit=limit, progress=False)
    return {"segm_mAP": r.segm_mAP, "mIoU": r.mIoU, "num_images": r.num_images, "eval_s": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--work-dir", default=str(ROOT / ".cache" / "bench_carsam"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bits", nargs="+", default=["w6a6", "w4a4", "w3a3"])
    ap.add_argument("--calib-seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--val-seeds", nargs="+", type=int, default=[2, 7])
    ap.add_argument("--num-val", type=int, default=200)
    ap.add_argument("--num-calib", type=int, default=32)
    ap.add_argument("--limit", type=int, help="evaluate only the first N validation images (quick runs)")
    ap.add_argument("--recon-iters", type=int, help="steps per unit (default: the device's schedule)")
    ap.add_argument("--jcar-pairing", default=CarsamConfig.pairing, choices=list(JCAR_PAIRINGS))
    ap.add_argument("--quantize-args", help="more quantize arguments for the reconstruction variants, e.g. "
                                             "'--recon-round-lr 1e-2' (a probe: give it a --tag)")
    ap.add_argument("--tag", help="suffix of the cell keys of this run's reconstruction cells (required with "
                                  "--quantize-args, so that probes never overwrite the default cells)")
    ap.add_argument("--jobs", type=int, default=1, help="quantize processes at once")
    ap.add_argument("--eval-jobs", type=int, default=1, help="evaluation processes at once")
    ap.add_argument("--eval-threads", type=int, default=1, help="ONNX Runtime and torch threads per evaluation")
    ap.add_argument("--cores", type=int, default=os.cpu_count(),
                    help="cores this run may use (two runs at once on one machine: give each its share)")
    ap.add_argument("--order", choices=["bits", "variant"], default="bits",
                    help="quantize queue: every variant of one bit width first (bits), or every bit width of one "
                         "variant first (variant: the variants' order is their priority)")
    ap.add_argument("--phase", choices=["all", "quantize", "eval"], default="all")
    ap.add_argument("--deadline", type=float, help="start no quantize process after this many seconds")
    ap.add_argument("--eval-deadline", type=float,
                    help="start no evaluation after this many seconds (default: none; --deadline is the quantize "
                         "processes' alone: a run that only evaluates cached models, e.g. with --deadline 1, "
                         "evaluates them all)")
    ap.add_argument("--first-alone", action="store_true",
                    help="quantize the first missing cell alone, on every core, before the others start and "
                         "before any evaluation: its wall time is the method's cost with nothing else on the machine")
    ap.add_argument("--out-md", default=str(ROOT / "docs" / "results.md"))
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--fp-only", action="store_true",
                    help="evaluate only the FP model on the validation seeds (run it once before several bench "
                         "runs share a work dir, or each evaluates FP itself)")
    a = ap.parse_args(argv)
    if a.quantize_args and not a.tag:
        ap.error("--quantize-args needs --tag (the cells of a probe must not take the default cells' keys)")
    t_start = time.perf_counter()
    work = Path(a.work_dir)
    (work / "models").mkdir(parents=True, exist_ok=True)
    (work / "cells").mkdir(parents=True, exist_ok=True)

    def log(*x):
        print(f"[{time.perf_counter() - t_start:6.0f} s]", *x, file=sys.stderr, flush=True)

    def late(deadline) -> bool:
        return deadline is not None and time.perf_counter() - t_start > deadline

    q_threads, eval_threads = thread_budget(a.cores, a.jobs, a.eval_jobs, a.eval_threads)
    log(f"threads: {q_threads} per quantize process x {a.jobs}, {eval_threads} per evaluation x {a.eval_jobs} "
        f"({a.cores} cores)")
    fp, fp_desc = fp_model(work, a.model, None)
    fp_hash = sha256_file(fp)[:16]
    vals = {s: dataset(work, s, a.num_val) for s in a.val_seeds}
    from carsam_onnx.data.builtin import CALIBRATION_SEED

    pool = dataset(work, CALIBRATION_SEED, CALIB_POOL)
    cells = [("fp", None, None)] + ([] if a.fp_only else queue_order(a.variants, a.bits, a.calib_seeds, a.order))
    defaults = method_defaults()
    results: dict = {}
    todo_q, todo_e = [], []
    for v, b, c in cells:
        key = "fp" if v == "fp" else cell_key(v, b, c, a)
        model = fp if v == "fp" else work / "models" / f"{key}.onnx"
        need = False
        made_by = work / "models" / f"{key}.defaults"
        if (v != "fp" and v not in CALIBRATORS and not a.table_only and model.is_file()
                and (not made_by.is_file() or made_by.read_text() != defaults)):
            model.unlink()                               # made under other method defaults: quantize again
        for vs, val in vals.items():
            fpr = {"fp": fp_hash, "val": sha256_file(val / "annotations.json")[:16], "limit": a.limit, "key": key,
                   "num_calib": a.num_calib}
            if v != "fp" and v not in CALIBRATORS:
                fpr["defaults"] = defaults
            elif v == "mse+smooth":
                fpr["smooth_alpha"] = SMOOTH_ALPHA          # a cell made at another alpha is not read back
            path = work / "cells" / f"{key}_v{vs}.json"
            res = cached(path, fpr)
            if res is None:
                need = True
                todo_e.append((key, vs, val, model, path, fpr))
            else:
                results[(key, vs)] = res
        if need and v != "fp" and not model.is_file():
            todo_q.append((key, quantize_cmd(fp, model, v, b, c, pool, a), model))

    pending_e: dict = {}
    for k, vs, val, m, path, fpr in todo_e:
        pending_e.setdefault(str(m), []).append((k, vs, val, m, path, fpr))
    ex = None
    if a.phase in ("all", "eval") and not a.table_only:   # spawn: forked workers deadlock in torch's thread pool
        ex = ProcessPoolExecutor(max_workers=max(1, a.eval_jobs), mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_eval_worker_init, initargs=(eval_threads,))
    futs: dict = {}

    def submit_evals(model: Path) -> None:
        """Evaluations start as soon as their model exists (they overlap the quantize processes)."""
        if ex is None or late(a.eval_deadline):
            return
        for k, vs, val, m, path, fpr in pending_e.pop(str(model), []):
            futs[ex.submit(_evaluate, str(m), str(val), eval_threads, a.limit)] = (k, vs, m, path, fpr)

    def collect(block: bool) -> None:
        done = [f for f in futs if f.done()] if not block else list(as_completed(list(futs)))
        for f in done:
            k, vs, m, path, fpr = futs.pop(f)
            try:
                r = f.result()
            except Exception as e:   # one failed cell must not lose the others
                log(f"{k} val{vs}: eval FAILED: {e}")
                continue
            tf, jf = work / "models" / f"{k}.time", work / "models" / f"{k}.jobs"
            if tf.is_file():
                r["quantize_s"] = float(tf.read_text())
            if jf.is_file():
                r["quantize_jobs"] = int(jf.read_text())
            r.update({"commit": git_commit(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")})
            write_json_atomic(path, {"fingerprint": fpr, "result": r})
            results[(k, vs)] = r
            log(f"{k} val{vs}: mAP {r['segm_mAP']:.2f} ({r['eval_s']:.0f} s)")

    quantizing = not a.table_only and a.phase in ("all", "quantize")
    deferred = [Path(m) for m in list(pending_e) if Path(m).is_file()]   # models that exist already (FP)
    if not (a.first_alone and quantizing and todo_q):   # else they wait: the first cell runs truly alone
        while deferred:
            submit_evals(deferred.pop(0))
    if quantizing:
        running: list = []
        queue = list(todo_q)
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(q_threads),
               "MKL_NUM_THREADS": str(q_threads)}
        alone = a.first_alone
        while queue or running:
            while queue and len(running) < (1 if alone else a.jobs) and not late(a.deadline):
                key, cmd, model = queue.pop(0)
                tmp = model.with_suffix(".part.onnx")
                cmd = [x if x != str(model) else str(tmp) for x in cmd]
                log("quantize", key, "(alone)" if alone else "")
                penv = {**env, "OMP_NUM_THREADS": str(a.cores), "MKL_NUM_THREADS": str(a.cores)} if alone else env
                running.append((key, subprocess.Popen(cmd, env=penv, stdout=open(work / "models" / f"{key}.log", "w"),
                                                      stderr=subprocess.STDOUT),
                                time.perf_counter(), tmp, model, 1 if alone else a.jobs))
            if late(a.deadline):
                queue.clear()
            time.sleep(1)
            collect(block=False)
            for r in list(running):
                key, p, t0, tmp, model, jobs = r
                if p.poll() is not None:
                    running.remove(r)
                    alone = False
                    while deferred:
                        submit_evals(deferred.pop(0))
                    if p.returncode == 0:
                        tmp.rename(model)
                        (work / "models" / f"{key}.defaults").write_text(defaults)   # read for recon cells
                        t = round(time.perf_counter() - t0, 1)
                        (work / "models" / f"{key}.time").write_text(str(t))
                        (work / "models" / f"{key}.jobs").write_text(str(jobs))   # what shared the machine
                        log(f"quantized {key} in {t:.0f} s")
                        submit_evals(model)
                    else:
                        log(f"{key}: quantize FAILED (rc {p.returncode}; {work / 'models' / (key + '.log')})")
    for m in deferred:   # the queue was cut by the deadline before the first cell started
        submit_evals(m)
    if ex is not None:
        collect(block=True)
        ex.shutdown()
    if a.phase == "quantize":   # nothing was scored: a table of dashes must not replace the last one
        log("quantize phase: no table written (run --phase eval with the same flags to score the models)")
        return 0
    if a.fp_only:          # nothing to tabulate: the FP cells are cached for the runs that follow
        for vs in a.val_seeds:
            log(f"fp val{vs}: " + (f"mAP {results[('fp', vs)]['segm_mAP']:.2f}" if ("fp", vs) in results else "none"))
        return 0
    write_section(Path(a.out_md), markdown(results, a, fp_desc), BEGIN, END)
    return 0


def markdown(results, a, fp_desc) -> str:
    flags = cpu_flags()
    cmd = "python tools/bench_carsam.py " + " ".join(shlex.quote(x) for x in (sys.argv[1:]))
    sched = f"{'GPU' if a.device.startswith('cuda') else 'CPU'} default schedule" if not a.recon_iters else \
        f"{a.recon_iters} steps per unit"
    lines = [f"## CAR-SAM ablation ({sched}, JCAR pairing `{a.jcar_pairing}`)", "",
             f"Made by `{cmd}` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC ({os.cpu_count()} CPU cores, "
             f"{flags or 'no AVX2'}; calibration device {a.device}).", "",
             f"- Model: {fp_desc}. Scores: ONNX Runtime (CPU) running the emitted Q/DQ ONNX, segm mAP over "
             f"{a.num_val if a.limit is None else a.limit} images per validation seed, ground-truth boxes.",
             f"- Cells: mean +- std over calibration seeds {', '.join(map(str, a.calib_seeds))} (n = seeds with a "
             f"result); {a.num_calib} calibration images each. Gap closed = (v - mse) / (FP - mse); kept = v / FP.",
             "- Seed 2 chose every default; seed 7 was never used to choose.", ""]
    for vs in a.val_seeds:
        fp = results.get(("fp", vs))
        fpv = fp["segm_mAP"] if fp else None
        lines += [f"### Validation seed {vs}" + (f" (FP {fpv:.2f})" if fpv is not None else ""), "",
                  "| bits | " + " | ".join(a.variants) + " |", "|---|" + "---|" * len(a.variants)]
        for bits in a.bits:
            row = [bits]
            base = _stats([results[(cell_key("mse", bits, c, a), vs)]["segm_mAP"] for c in a.calib_seeds
                           if (cell_key("mse", bits, c, a), vs) in results])
            for v in a.variants:
                s = _stats([results[(cell_key(v, bits, c, a), vs)]["segm_mAP"] for c in a.calib_seeds
                            if (cell_key(v, bits, c, a), vs) in results])
                if s is None:
                    row.append("-")
                    continue
                txt = f"{s[0]:.2f} +- {s[1]:.2f} (n={s[2]})"
                if fpv:                    # (an untrained model can score 0: no share of it)
                    txt += f"; kept {100 * s[0] / fpv:.1f}%"
                    if v not in CALIBRATORS and base is not None and fpv > base[0]:
                        txt += f", gap closed {100 * (s[0] - base[0]) / (fpv - base[0]):.0f}%"
                row.append(txt)
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    qt, jobs = {}, set()
    for v in a.variants:
        rs = [results[(cell_key(v, b, c, a), vs)] for b in a.bits for c in a.calib_seeds for vs in a.val_seeds
              if (cell_key(v, b, c, a), vs) in results]
        ts = [r["quantize_s"] for r in rs if r.get("quantize_s")]
        jobs |= {r.get("quantize_jobs") for r in rs if r.get("quantize_s")}
        if ts:
            qt[v] = statistics.median(ts)
    if qt:
        lines += [f"Median quantize wall time per cell (s; {_sharing(jobs)}): " +
                  ", ".join(f"{v} {t:.0f}" for v, t in qt.items()), ""]
    return "\n".join(lines)


def _sharing(jobs: set) -> str:
    """How many quantize processes the run that made each cell allowed at once (its --jobs; 1 for --first-alone),
    as recorded beside the cell's model: a cell made by another run, e.g. `--phase quantize` before `--phase eval`,
    keeps that run's count; older cells have none."""
    known = sorted(j for j in jobs if j)
    if not known:
        return "processes at once: not recorded"
    span = str(known[0]) if len(known) == 1 else f"{known[0]}-{known[-1]}"
    return f"up to {span} processes at once" + (" where recorded" if None in jobs else "")


if __name__ == "__main__":
    sys.exit(main())
