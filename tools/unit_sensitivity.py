"""Where a quantized model loses its accuracy: each group of reconstruction units put back in float, one group at a
time, the rest kept exactly as calibrated, scored by ONNX Runtime.

    carsam-onnx quantize ref.onnx -o q.onnx --bits w4a4 --method carsam --save-calibration q.npz ...
    python tools/unit_sensitivity.py ref.onnx q.npz --dataset VAL --work-dir W [--encoder-blocks] [--jobs 2]

- Groups come from the graph (passes/units.py find_units: the units reconstruction learns, JCAR's joint units
  split into their members): `encoder` (every image-encoder block), `neck`, `decoder` (every mask-decoder unit),
  each decoder unit alone and, with --encoder-blocks, each encoder block (its attention and MLP units).
- Putting a group in float drops its weight sites (the FP weight, not MAC's corrected one, goes back; a weight
  --smooth migrated keeps its migrated value, which with its norm's computes the FP function) and every
  activation site with a quantized consumer in the group (a value shared with another group's consumer goes
  float for both: counted where it is dropped). Everything else is emitted from the saved calibration unchanged,
  so the row `none` is the shipped model.
- "recovered" is the row's mAP minus `none`'s; "share" divides it by the FP model's mAP minus `none`'s: the part
  of the quantization loss that sits in the group. Shares need not add up to 100% (errors interact).
- `--sites UNIT ...` adds one group per weight and per activation site of those units.
- Results are cached per (calibration file, group, dataset) in WORK/sensitivity/, so a rerun only evaluates
  what is missing.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_accuracy import sha256_file, write_json_atomic  # noqa: E402
from bench_carsam import _evaluate  # noqa: E402


def unit_groups(units, encoder_blocks: bool) -> dict[str, list]:
    """Group name -> units, in the order the table lists them."""
    enc = [u for u in units if u.role.startswith("encoder")]
    neck = [u for u in units if u.role == "neck"]
    dec = [u for u in units if u.in_decoder]
    groups = {"none": [], "encoder": enc, "neck": neck, "decoder": dec}
    groups.update({u.name: [u] for u in dec})
    if encoder_blocks:
        for b in sorted({u.block for u in enc}):
            groups[f"encoder block {b}"] = [u for u in enc if u.block == b]
    return groups


def site_groups(unit) -> dict[str, list]:
    """One group per weight and per activation site of `unit`: "UNIT weight NAME", "UNIT act VALUE"."""
    out = {f"{unit.name} weight {w}": [replace(unit, weights=(w,), activations=())] for w in unit.weights}
    out.update({f"{unit.name} act {v}": [replace(unit, weights=(), activations=(v,))] for v in unit.activations})
    return out


def float_group(plan, artifact, units, migrated: frozenset = frozenset()):
    """(plan, artifact) with the units' weight and activation sites removed: emitted, they stay float. Their
    float weights go back to the FP model's, except `migrated` ones (--smooth's pairs: the norm before them keeps
    its migrated parameters, and the two together compute the FP function)."""
    weights = {w for u in units for w in u.weights}
    values = {v for u in units for v in u.activations}
    plan = replace(plan, weights=tuple(w for w in plan.weights if w.initializer not in weights),
                   activations=tuple(a for a in plan.activations if a.value not in values))
    art = replace(artifact, float_weights={k: v for k, v in artifact.float_weights.items()
                                           if k not in weights or k in migrated})
    return plan, art


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="the FP model the calibration was made on")
    ap.add_argument("calibration", help="a file written by quantize --save-calibration")
    ap.add_argument("--dataset", required=True, help="validation folder (as `carsam-onnx data synth` writes)")
    ap.add_argument("--work-dir", required=True)
    ap.add_argument("--encoder-blocks", action="store_true", help="also each encoder block alone")
    ap.add_argument("--sites", nargs="*", default=[], metavar="UNIT",
                    help="also each weight and activation site of these units alone (unit names as the table prints)")
    ap.add_argument("--groups", nargs="*", help="only these groups (names as the table prints them)")
    ap.add_argument("--jobs", type=int, default=2, help="evaluations at once (one ONNX Runtime thread each)")
    ap.add_argument("--limit", type=int, help="evaluate the first N images only")
    a = ap.parse_args(argv)

    import onnx

    from carsam_onnx.artifact import load_artifact
    from carsam_onnx.modelio import file_sha256, save_model
    from carsam_onnx.passes.plan import plan_quantization
    from carsam_onnx.passes.units import find_units
    from carsam_onnx.quantize import emit_model

    work = Path(a.work_dir) / "sensitivity"
    work.mkdir(parents=True, exist_ok=True)
    saved = load_artifact(a.calibration)
    if file_sha256(a.model) != saved.model_sha256:
        print(f"error: {a.calibration} was made for another model than {a.model}", file=sys.stderr)
        return 2
    model = onnx.load(a.model)
    plan = plan_quantization(model, saved.config)
    units = find_units(model, plan)
    groups = unit_groups(units, a.encoder_blocks)
    migrated = frozenset()
    if "smooth_alpha" in saved.artifact.info:
        from carsam_onnx.passes.smooth import find_smooth_pairs

        migrated = frozenset(w for p in find_smooth_pairs(model, plan) for w, _ in p.weights)
    by_name = {u.name: u for u in units}
    missing = [u for u in a.sites if u not in by_name]
    if missing:
        print(f"error: --sites: no unit {', '.join(missing)}; units: {', '.join(by_name)}", file=sys.stderr)
        return 2
    for u in a.sites:
        groups.update(site_groups(by_name[u]))
    names = ["fp", *(a.groups or groups)]
    unknown = [g for g in names[1:] if g not in groups]
    if unknown:
        print(f"error: unknown group(s) {', '.join(unknown)}; groups: {', '.join(groups)}", file=sys.stderr)
        return 2
    key = sha256_file(Path(a.calibration))[:12] + "_" + sha256_file(Path(a.dataset) / "annotations.json")[:8]
    results, todo = {}, []
    for g in names:
        path = work / f"{key}_{g.replace(' ', '_')}_{a.limit}.json"
        if path.is_file():
            results[g] = json.loads(path.read_text())
            continue
        if g == "fp":
            onnx_path = Path(a.model)
        else:
            onnx_path = work / f"{key}_{g.replace(' ', '_')}.onnx"
            p, art = float_group(plan, saved.artifact, groups[g], migrated)
            qmodel, _ = emit_model(model, p, art, saved.config)
            save_model(qmodel, onnx_path, force=True)
        todo.append((g, onnx_path, path))
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=max(1, a.jobs), mp_context=ctx) as ex:
        futs = {g: (ex.submit(_evaluate, str(m), a.dataset, 1, a.limit), path, m) for g, m, path in todo}
        for g, (f, path, m) in futs.items():
            results[g] = f.result()
            write_json_atomic(path, results[g])
            if g != "fp":
                m.unlink()
            print(f"{g}: {results[g]['segm_mAP']:.2f}", file=sys.stderr, flush=True)
    fp, q = results["fp"]["segm_mAP"], results.get("none", {}).get("segm_mAP")
    print(f"\nFP {fp:.2f}" + ("" if q is None else f", quantized (none in float) {q:.2f}"))
    print("\n| in float | segm mAP | recovered | share of the loss |\n|---|---|---|---|")
    for g in names[1:]:
        m = results[g]["segm_mAP"]
        rec = "" if q is None else f"{m - q:+.2f}"
        share = "" if q is None or fp == q else f"{100 * (m - q) / (fp - q):.0f}%"
        print(f"| {g} | {m:.2f} | {rec} | {share} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
