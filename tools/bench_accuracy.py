"""Accuracy table of the calibrator-only baselines: ORT quantize_static vs ours, segm mAP and share of FP.

    .venv/bin/python tools/bench_accuracy.py [--model FP.onnx | --random-init SEED] [--work-dir DIR]
        [--num-val 200] [--limit N] [--bits w8a8 w6a6 w4a4 w3a3] [--ours minmax percentile mse]
        [--ort minmax percentile] [--out-md docs/results.md] [--table-only] [--rerun] [--keep-models]

- FP model: --model, or the bundled trained reference model exported once to WORK/fp_<weights sha256[:12]>.onnx (dynamo exporter);
  --random-init SEED exports a random-init reference model instead (plumbing only: its metrics mean nothing).
- Validation set: WORK/val, synthetic, `--num-val` images from VALIDATION_SEED (2); prompts are the
  ground-truth boxes; `--limit N` evaluates only its first N images (a quick run).
- Calibration: the built-in set (32 images, CALIBRATION_SEED 1, box prompts), through the same
  `calibration_samples` + `build_feeds` for both tools; percentile 99.99 (each side) for both.
- Cells: rows FP, W8A8, W6A6, W4A4, W3A3; columns ORT quantize_static MinMax / Percentile (tools/ort_quantize_static.py,
  quantizing our plan's nodes; "n/e" where quantize_static has no such integer type) and ours (`carsam_onnx.quantize`)
  MinMax / Percentile / MSE. Every model is evaluated with `carsam_onnx.eval.runner.evaluate` on ONNX Runtime
  (CPU). Adding a column (CAR-SAM) is one entry in COLUMNS.
- Resumable: each cell's result is cached in WORK/cells/{all,limitN}/KEY.json with a fingerprint of what decides it (FP model
  hash, validation annotations hash, limit, calibration settings); a rerun skips cells whose fingerprint matches
  (--rerun recomputes them; the fingerprint leaves out the code version, each cell records its git commit).
  The quantized model is deleted after its evaluation unless --keep-models.
- Writes the markdown section (command, date, machine, both tables, per-cell times, the acceptance lines) into
  --out-md between two marker comments, atomically, leaving the rest of the file as it is (appends the section
  when the file has no markers). --table-only credits the run that computed the cells (WORK/results.json).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from carsam_onnx.config import BitWidths, QuantConfig  # noqa: E402
from carsam_onnx.errors import CarsamError, InputError, OutputError  # noqa: E402
from carsam_onnx.modelio import atomic_write, write_json  # noqa: E402
from carsam_onnx.runtime.ort_settings import host_isa_flags  # noqa: E402

ROWS = ("w8a8", "w6a6", "w4a4", "w3a3")
NUM_VAL = 200
W8A8_KEEP = 0.97          # acceptance: W8A8 MinMax keeps >= 97% of FP mAP
W4A4_EASY = 0.90          # a calibrator-only W4A4 above 90% of FP leaves little room to show a method's worth


@dataclass(frozen=True)
class Column:
    tool: str          # "ort" | "ours"
    method: str        # minmax | percentile | mse | carsam ...

    @property
    def key(self) -> str:
        return f"{self.tool}_{self.method}"

    @property
    def title(self) -> str:
        names = {"minmax": "MinMax", "percentile": "Percentile", "mse": "MSE", "carsam": "CAR-SAM"}
        who = "ORT quantize_static" if self.tool == "ort" else "ours"
        return f"{who} {names.get(self.method, self.method)}"


def columns(ort_methods, our_methods) -> list[Column]:
    return [Column("ort", m) for m in ort_methods] + [Column("ours", m) for m in our_methods]


# ---- inputs ---------------------------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def fp_model(work: Path, model: str | None, random_init: int | None) -> tuple[Path, str]:
    """(FP model path, description)."""
    if model is not None:
        p = Path(model)
        if not p.is_file():
            raise InputError(f"--model {p} not found")
        return p, f"`{p.name}`"
    from carsam_onnx.export.models import REFERENCE_WEIGHTS, build_sam, sha256_of
    from carsam_onnx.export.onnx_export import export_onnx
    from carsam_onnx.modelio import save_model

    # keyed by the bundled weights, so retrained weights never meet a stale export
    name = (f"fp_{sha256_of(REFERENCE_WEIGHTS)[:12]}.onnx" if random_init is None
            else f"fp_random{random_init}.onnx")
    path = work / name
    desc = ("the bundled trained reference model (`carsam-onnx export --model-type reference`)" if random_init is None
            else f"a RANDOM-INIT reference-architecture model (seed {random_init}): plumbing only, metrics meaningless")
    if not path.exists():
        built = build_sam("reference", seed=random_init)       # CheckpointError if the trained weights are missing
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            save_model(export_onnx(built, "full", exporter="dynamo"), path, force=True)
    return path, desc


def validation_set(work: Path, num_val: int) -> Path:
    from carsam_onnx.data.builtin import SYNTH_IMAGE_SIZE, VALIDATION_SEED
    from carsam_onnx.data.synth import write_synthetic_coco

    out = work / f"val_s{VALIDATION_SEED}_n{num_val}"
    if not (out / "annotations.json").is_file():
        write_synthetic_coco(out, num_val, VALIDATION_SEED, image_size=SYNTH_IMAGE_SIZE, force=True)
    return out


# ---- cells ----------------------------------------------------------------------------------------------------
def fingerprint(fp_hash: str, val_hash: str, limit: int | None, col: Column | None, bits: str | None,
                config: QuantConfig) -> dict:
    return {"fp_model": fp_hash, "val_annotations": val_hash, "limit": limit, "tool": col.tool if col else "fp",
            "method": col.method if col else None, "bits": bits, "num_calib": config.num_calib, "seed": config.seed,
            "percentile": config.percentile if col and col.method == "percentile" else None}


def quantize_cell(col: Column, bits: str, fp: Path, out: Path, config: QuantConfig) -> dict:
    """Quantize `fp` for one cell; returns {"seconds": ..., plus tool-specific notes}."""
    b = BitWidths.parse(bits)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")        # built-in calibration set notice
        if col.tool == "ort":
            from ort_quantize_static import ort_quantize_static

            rep = ort_quantize_static(fp, out, col.method, b, num_calib=config.num_calib, seed=config.seed,
                                      percentile=config.percentile, force=True)
            notes = {"weights": rep.weights_quantized, "activations": rep.activations_quantized,
                     "float_consumers_restored": rep.float_consumers_restored}
        else:
            from carsam_onnx.quantize import quantize

            cfg = QuantConfig(bits=b, method=col.method, num_calib=config.num_calib, seed=config.seed,
                              percentile=config.percentile)
            rep = quantize(fp, out, cfg, force=True, progress=False)
            notes = {"weights": sum(rep.weights_by_kind.values()),
                     "activations": sum(rep.activations_by_kind.values()),
                     "heldout_sqnr_db": {k: round(v, 2) for k, v in rep.sqnr_db.items()}}
    return {"quantize_s": round(time.perf_counter() - t0, 1), **notes}


def evaluate_cell(model: Path, val: Path, limit: int | None, progress: bool) -> dict:
    from carsam_onnx.eval.runner import evaluate

    t0 = time.perf_counter()
    r = evaluate(model, val, limit=limit, runtime="ort", progress=progress)
    return {"segm_mAP": r.segm_mAP, "AP50": r.AP50, "AP75": r.AP75, "mIoU": r.mIoU, "num_images": r.num_images,
            "num_instances": r.num_instances, "eval_s": round(time.perf_counter() - t0, 1)}


def write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, obj, force=True)


def git_commit() -> str:
    """The repository's HEAD commit (provenance recorded with each cell; not part of its fingerprint)."""
    import subprocess

    try:
        r = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        return r.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def cell_path(work: Path, key: str, limit: int | None) -> Path:
    """Where a cell's result is cached: quick (--limit) and full runs keep separate caches."""
    return work / "cells" / ("all" if limit is None else f"limit{limit}") / f"{key}.json"


def run_cell(key: str, fpr: dict, work: Path, make, log, rerun: bool = False) -> dict | None:
    """Cached result of a cell (unless `rerun`), or run `make()` -> dict and cache it with its fingerprint."""
    path = cell_path(work, key, fpr["limit"])
    if path.is_file() and not rerun:
        cached = json.loads(path.read_text())
        if cached.get("fingerprint") == fpr:
            log(f"{key}: cached (mAP {cached['result']['segm_mAP']:.2f})")
            return cached["result"]
    t0 = time.perf_counter()
    try:
        result = make()
    except CarsamError as e:          # a cell that fails is reported in the table, not fatal to the others
        log(f"{key}: FAILED: {e}")
        result = {"error": str(e)}
    result["cell_s"] = round(time.perf_counter() - t0, 1)
    result["commit"] = git_commit()
    write_json_atomic(path, {"fingerprint": fpr, "result": result})
    if "error" not in result:
        log(f"{key}: mAP {result['segm_mAP']:.2f} mIoU {result['mIoU']:.4f} ({result['cell_s']:.0f} s)")
    return result


# ---- table ----------------------------------------------------------------------------------------------------
def _share(v: float, fp: float) -> str:
    return f"{100 * v / fp:.0f}%" if fp > 0 else "n/a"


def cell_text(res: dict | None, fp: dict | None, metric: str, expressible: bool) -> str:
    if not expressible:
        return "n/e"
    if res is None:
        return "–"
    if "error" in res:
        return "failed"
    v = res[metric]
    if metric == "segm_mAP":
        return f"{v:.1f} ({_share(v, fp[metric])})" if fp else f"{v:.1f}"
    return f"{v:.3f} ({_share(v, fp[metric])})" if fp else f"{v:.3f}"


def verdicts(results: dict, fp: dict | None, cols: list[Column]) -> list[str]:
    """The acceptance lines: W8A8 MinMax share of FP, best calibrator-only W4A4, where W3A3 falls."""
    if not fp or fp.get("segm_mAP", 0) <= 0:
        return ["No shares of FP mAP to report: " + ("the FP cell has not run yet." if not fp else
                "the FP model's mAP is 0 (a random-init model?).")]
    out = []
    fpm = fp["segm_mAP"]
    mm = results.get(("w8a8", "ours_minmax"))
    if mm and "error" not in mm:
        share = mm["segm_mAP"] / fpm
        peer = results.get(("w8a8", "ort_minmax"))
        also = (f"; ORT quantize_static W8A8 MinMax keeps {100 * peer['segm_mAP'] / fpm:.1f}%"
                if peer and "error" not in peer else "")
        out.append(f"- W8A8 MinMax (ours) keeps {100 * share:.1f}% of FP mAP "
                   f"({'meets' if share >= W8A8_KEEP else 'FAILS'} the >= {100 * W8A8_KEEP:.0f}% acceptance){also}.")
    for bits in ("w4a4", "w3a3"):
        cands = [(results[(bits, c.key)]["segm_mAP"], c) for c in cols
                 if c.method != "carsam" and results.get((bits, c.key)) and "error" not in results[(bits, c.key)]]
        if not cands:
            continue
        best, col = max(cands, key=lambda t: t[0])
        share = best / fpm
        line = (f"- Best calibrator-only {bits.upper()}: {col.title}, {best:.1f} mAP = {100 * share:.1f}% of FP; "
                f"worst: {min(c[0] for c in cands):.1f} mAP.")
        if bits == "w4a4":
            line += (f" It keeps MORE than {100 * W4A4_EASY:.0f}% of FP, so on this model W4A4 leaves little room "
                     "to show a method's worth; look at W3A3." if share > W4A4_EASY else
                     f" It keeps less than {100 * W4A4_EASY:.0f}% of FP: W4A4 leaves room for a method to show its worth.")
        out.append(line)
    return out


def markdown(results: dict, fp: dict | None, cols: list[Column], rows: list[str], meta: dict) -> str:
    from ort_quantize_static import expressible

    def table(metric: str, title: str) -> list[str]:
        head = ["setting"] + [c.title for c in cols]
        lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        fp_cell = cell_text(fp, None, metric, True)
        lines.append("| FP | " + " | ".join([fp_cell] * len(cols)) + " |")
        for bits in rows:
            b = BitWidths.parse(bits)
            cells = [cell_text(results.get((bits, c.key)), fp, metric,
                               expressible(b) if c.tool == "ort" else True) for c in cols]
            lines.append(f"| {bits.upper()} | " + " | ".join(cells) + " |")
        return lines

    quant_s = [r["quantize_s"] for r in results.values() if r and "quantize_s" in r]
    eval_s = [r["eval_s"] for r in results.values() if r and "eval_s" in r]
    cell_s = [r["cell_s"] for r in results.values() if r and "cell_s" in r and "error" not in r]
    failed = [f"{b} {k}: {r['error']}" for (b, k), r in results.items() if r and "error" in r]
    lines = [
        "## Accuracy: calibrator-only baselines (ORT quantize_static vs ours)",
        "",
        f"Made by `{meta['command']}` on {meta['date']} ({meta['machine']}); cells computed at commit(s) "
        f"{', '.join(sorted({r.get('commit', '?') for r in [fp, *results.values()] if r})) or '–'}.",
        "",
        f"- Model: {meta['model']}; FP model sha256 {meta['fp_hash']}.",
        f"- Validation: {meta['val']}; ground-truth box prompts, one per instance; ONNX Runtime {meta['ort']} (CPU).",
        f"- Calibration: built-in synthetic set ({meta['num_calib']} images, seed 1, one GT box each), the same feeds "
        f"for both tools; percentile {meta['percentile']} (clips {100 - meta['percentile']:.2g}% on each side) for both.",
        "- Quantized: the same nodes in both tools (our plan: encoder-block and decoder-transformer linears, the "
        "neck convolutions, both inputs of both attention MatMuls); patch embedding, prompt encoder, mask "
        "upscaling, hypernetwork MLPs and IoU head stay float. Weights symmetric per output channel, activations "
        "per tensor asymmetric. ORT differs from ours only in its calibrators (2048-bin histogram percentile) "
        "and in its INT4 weight scale, absmax/7.5 instead of absmax/7 (tools/ort_quantize_static.py).",
        "- ORT and the attention MatMuls: with MatMul in `op_types_to_quantize`, quantize_static quantizes both "
        "inputs of a MatMul whose two inputs are computed as activations (per tensor, UINT8/UINT4), which is how "
        "Q.K^T and softmax.V get quantized here; left to itself (`--all-matmuls`) it would also quantize the mask "
        "head's hyper_in x upscaled-embedding product, which our plan keeps float. quantize_static also rewires "
        "float consumers of a quantized value (14 decoder Adds/Transpose) onto it; the peer script gives them "
        "their float input back so that only the calibration differs.",
        "- Cell: segm mAP (share of FP mAP). n/e: not expressible (quantize_static has integer types for 8 and "
        "4 bits only). –: not run yet.",
        "",
        *table("segm_mAP", "segm mAP (share of FP)"),
        "",
        *table("mIoU", "mIoU (share of FP)"),
        "",
        *verdicts(results, fp, cols),
    ]
    if cell_s:
        lines += ["", f"Time per cell on this machine (median over {len(cell_s)} cells): quantize "
                      f"{statistics.median(quant_s) if quant_s else 0:.0f} s, evaluate "
                      f"{statistics.median(eval_s) if eval_s else 0:.0f} s, total {statistics.median(cell_s):.0f} s."]
    if failed:
        lines += ["", "Failed cells:"] + [f"- {f}" for f in failed]
    return "\n".join(lines) + "\n"


SECTION_BEGIN = "<!-- tools/bench_accuracy.py writes from here -->"
SECTION_END = "<!-- tools/bench_accuracy.py writes up to here -->"


def splice_section(existing: str | None, section: str) -> str:
    """The document with the table section between the markers replaced (or appended when the document has
    neither marker): the rest of a hand-written results file survives a rerun untouched."""
    block = f"{SECTION_BEGIN}\n{section.rstrip()}\n{SECTION_END}"
    if existing is None:
        return block + "\n"
    has_begin, has_end = SECTION_BEGIN in existing, SECTION_END in existing
    if not has_begin and not has_end:
        return existing.rstrip("\n") + "\n\n" + block + "\n"
    a, b = existing.find(SECTION_BEGIN), existing.find(SECTION_END)
    if not (has_begin and has_end) or existing.count(SECTION_BEGIN) > 1 or existing.count(SECTION_END) > 1 or b < a:
        raise OutputError("the output document's bench_accuracy markers are broken (each must appear once, "
                          "begin before end); fix them or choose another --out-md")
    return existing[:a] + block + existing[b + len(SECTION_END):]


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write(path, text, force=True)


def computed_by(work: Path, argv) -> dict:
    """For --table-only: the command, date and machine of the run that computed the cells (results.json), so
    that the table credits that run and not the rebuild."""
    prev = work / "results.json"
    try:
        meta = json.loads(prev.read_text())["meta"]
    except (OSError, ValueError, KeyError):
        return {}
    rebuilt = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    date = meta["date"].split(" (table rebuilt")[0]
    return {"command": meta["command"], "date": f"{date} (table rebuilt from its cells on {rebuilt})",
            "machine": meta["machine"]}


# ---- main -----------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    d = QuantConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="FP full SAM ONNX model (dynamo export); default: the trained reference model")
    src.add_argument("--random-init", type=int, metavar="SEED",
                     help="export a random-init reference model (plumbing only: metrics meaningless)")
    p.add_argument("--work-dir", default=str(ROOT / ".cache" / "bench_accuracy"))
    p.add_argument("--num-val", type=int, default=NUM_VAL, help=f"validation images (default {NUM_VAL})")
    p.add_argument("--limit", type=int, help="evaluate only the first N validation images (quick run)")
    p.add_argument("--bits", nargs="+", default=list(ROWS))
    p.add_argument("--ours", nargs="*", default=["minmax", "percentile", "mse"], help="our calibration methods")
    p.add_argument("--ort", nargs="*", default=["minmax", "percentile"], help="ORT quantize_static calibrators")
    p.add_argument("--num-calib", type=int, default=d.num_calib)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--percentile", type=float, default=d.percentile)
    p.add_argument("--out-md", default=str(ROOT / "docs" / "results.md"),
                   help="markdown file whose marked section gets the table (created, or the section appended, "
                        "when absent)")
    p.add_argument("--table-only", action="store_true", help="only rebuild the table from cached cells")
    p.add_argument("--rerun", action="store_true",
                   help="recompute cached cells (the cache key does not include the code version; each cell records "
                        "the commit it was made at)")
    p.add_argument("--keep-models", action="store_true", help="keep the quantized models in WORK/models")
    p.add_argument("-q", "--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    import onnxruntime as ort

    a = build_parser().parse_args(argv)
    log = (lambda *_: None) if a.quiet else (lambda m: print(f"[bench_accuracy] {m}", flush=True))
    try:
        rows = [str(BitWidths.parse(b)) for b in a.bits]
        if a.num_val < 1 or (a.limit is not None and a.limit < 1):
            raise InputError("--num-val and --limit must be >= 1")
        config = QuantConfig(num_calib=a.num_calib, seed=a.seed, percentile=a.percentile)
        for m in a.ours:
            QuantConfig(method=m)              # InputError for an unknown method
        cols = columns(a.ort, a.ours)
        work = Path(a.work_dir)
        work.mkdir(parents=True, exist_ok=True)
        fp_path, fp_desc = fp_model(work, a.model, a.random_init)
        val = validation_set(work, a.num_val)
        fp_hash, val_hash = sha256_file(fp_path), sha256_file(val / "annotations.json")
        from ort_quantize_static import expressible

        def fpr(col, bits):
            return fingerprint(fp_hash, val_hash, a.limit, col, bits, config)

        def cached_only(key, f):
            p = cell_path(work, key, a.limit)
            if p.is_file():
                c = json.loads(p.read_text())
                return c["result"] if c.get("fingerprint") == f else None
            return None

        progress = not a.quiet and sys.stderr.isatty()
        if a.table_only:
            fp_res = cached_only("fp", fpr(None, None))
        else:
            fp_res = run_cell("fp", fpr(None, None), work, lambda: evaluate_cell(fp_path, val, a.limit, progress), log,
                              a.rerun)
        results: dict = {}
        for bits in rows:
            for col in cols:
                if col.tool == "ort" and not expressible(BitWidths.parse(bits)):
                    continue
                key = f"{bits}_{col.key}"
                if a.table_only:
                    results[(bits, col.key)] = cached_only(key, fpr(col, bits))
                    continue

                def make(col=col, bits=bits, key=key):
                    out = work / "models" / f"{key}.onnx"
                    out.parent.mkdir(parents=True, exist_ok=True)
                    info = quantize_cell(col, bits, fp_path, out, config)
                    try:
                        info.update(evaluate_cell(out, val, a.limit, progress))
                    finally:
                        if not a.keep_models:
                            for p in out.parent.glob(out.name + "*"):
                                p.unlink()
                    return info

                results[(bits, col.key)] = run_cell(key, fpr(col, bits), work, make, log, a.rerun)
        n_img = (fp_res or {}).get("num_images", a.limit or a.num_val)
        n_inst = (fp_res or {}).get("num_instances", "?")
        meta = {
            "command": "python tools/bench_accuracy.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:])),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.processor() or platform.system()}, "
                       f"CPU flags: {host_isa_flags()}",
            **(computed_by(work, argv) if a.table_only else {}),
            "model": fp_desc, "fp_hash": fp_hash, "ort": ort.__version__,
            "val": f"synthetic set seed 2, {n_img} of {a.num_val} images, {n_inst} instances",
            "num_calib": config.num_calib, "percentile": config.percentile,
        }
        md = markdown(results, fp_res, cols, rows, meta)
        out_md = Path(a.out_md)
        write_text_atomic(out_md, splice_section(out_md.read_text() if out_md.is_file() else None, md))
        write_json_atomic(work / "results.json", {"meta": meta, "fp": fp_res,
                                                  "cells": {f"{b}_{k}": r for (b, k), r in results.items()}})
        log(f"wrote {a.out_md}")
        if not a.quiet:
            print(md)
    except CarsamError as e:
        print(f"bench_accuracy: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
