"""Issue 9: output SQNR of a random-init vit_b decoder, W8A8 MinMax, per --int8-weights format, under a user's
default ONNX Runtime session and at ORT_DISABLE_ALL (the Q/DQ graph as written).

    python tools/int8_format_sqnr.py build --dir DIR      # export + quantize (s8, s7, u8); run on any CPU
    python tools/int8_format_sqnr.py measure --dir DIR    # SQNR table; run on the CPU under test
    python tools/int8_format_sqnr.py full --fp FP.onnx --dataset VAL Q1.onnx Q2.onnx ... [--images 2]
        # a full model (e.g. the reference model) on the first images of a COCO-format set, one GT box each:
        # mask-logit SQNR vs FP (at ORT_DISABLE_ALL) under the default session and at ORT_DISABLE_ALL

`measure` prints one JSON line per (format, session) with the CPU's flags. Run it under an emulated CPU without
VNNI (`qemu-x86_64 -cpu Haswell-noTSX python tools/int8_format_sqnr.py measure ...`) to see what an AVX2-only
host computes; emulated runs are for numerics only, never for latency.
"""
from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np

FORMATS = ("s8", "s7", "u8")


def _feeds(n: int = 3, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"image_embeddings": rng.normal(size=(1, 256, 64, 64)).astype(np.float32),
             "point_coords": rng.uniform(0, 1024, size=(1, 2, 2)).astype(np.float32),
             "point_labels": np.array([[2.0, 3.0]], np.float32)} for _ in range(n)]


def build(d: Path) -> None:
    from carsam_onnx.config import BitWidths, QuantConfig
    from carsam_onnx.export.models import build_sam
    from carsam_onnx.export.onnx_export import export_onnx
    from carsam_onnx.modelio import save_model
    from carsam_onnx.quantize import quantize

    d.mkdir(parents=True, exist_ok=True)
    fp = d / "vit_b_decoder.onnx"
    if not fp.exists():
        save_model(export_onnx(build_sam("vit_b", seed=0), part="decoder"), fp, force=True)
    emb = np.random.default_rng(0).standard_normal((6, 256, 64, 64)).astype(np.float32)
    np.savez(d / "emb.npz", image_embeddings=emb)
    for f in FORMATS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = quantize(fp, d / f"w8a8_{f}.onnx", QuantConfig(bits=BitWidths(8, 8), num_calib=4, int8_weights=f),
                         embeddings=d / "emb.npz", force=True, progress=False)
        print(f, r.output_bytes)


def measure(d: Path, n_feeds: int = 3, formats: tuple[str, ...] = FORMATS) -> None:
    import onnxruntime as ort

    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from eval_session_kinds import cpu_flags
    from carsam_onnx.qmath import sqnr_db

    def sess(path, level):
        so = ort.SessionOptions()
        if level:
            so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    feeds = _feeds()[:n_feeds]
    fp = sess(d / "vit_b_decoder.onnx", "ORT_DISABLE_ALL")
    ref = [fp.run(None, f) for f in feeds]
    for f in formats:
        for level in (None, "ORT_DISABLE_ALL"):
            s = sess(d / f"w8a8_{f}.onnx", level)
            got = [s.run(None, x) for x in feeds]
            row = {"format": f, "session": level or "default", "cpu_flags": cpu_flags()}
            for i, name in enumerate(o.name for o in s.get_outputs()):
                row[name] = round(sqnr_db(np.concatenate([r[i].ravel() for r in ref]),
                                          np.concatenate([g[i].ravel() for g in got])), 2)
            print(json.dumps(row), flush=True)


def full(fp_path: Path, dataset: Path, models: list[str], n_images: int) -> None:
    import onnx
    import onnxruntime as ort
    from PIL import Image

    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from eval_session_kinds import cpu_flags
    from carsam_onnx.data.coco import load_coco_dataset
    from carsam_onnx.data.preprocess import preprocess_image
    from carsam_onnx.data.prompts import box_inputs
    from carsam_onnx.samgraph import split_full_model
    from carsam_onnx.qmath import sqnr_db

    ds = load_coco_dataset(dataset)
    fp_model = onnx.load(str(fp_path), load_external_data=False)
    size = next(i for i in fp_model.graph.input if i.name == "image").type.tensor_type.shape.dim[-1].dim_value
    feeds = []
    for img_id in sorted(ds.images)[:n_images]:
        img = ds.images[img_id]
        pixels = np.asarray(Image.open(ds.images_dir / img.file_name).convert("RGB"))
        x, geo = preprocess_image(pixels, size)
        ann = ds.coco.loadAnns(ds.coco.getAnnIds(imgIds=[img_id]))[0]
        bx, by, bw, bh = ann["bbox"]
        coords, labels = box_inputs(np.array([[bx, by, bx + bw, by + bh]]), geo)
        feeds.append((x, coords.astype(np.float32), labels.astype(np.float32)))

    def run(path, level):
        enc, dec, _ = split_full_model(onnx.load(str(path)))
        so = ort.SessionOptions()
        if level:
            so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        es = ort.InferenceSession(enc.SerializeToString(), so, providers=["CPUExecutionProvider"])
        dsess = ort.InferenceSession(dec.SerializeToString(), so, providers=["CPUExecutionProvider"])
        want = {i.name for i in dsess.get_inputs()}
        outs = []
        for x, c, lab in feeds:
            e = dict(zip([o.name for o in es.get_outputs()], es.run(None, {"image": x})))
            outs.append(dsess.run(None, {**{k: v for k, v in e.items() if k in want}, "point_coords": c,
                                         "point_labels": lab})[0].ravel())
        return np.concatenate(outs)

    ref = run(fp_path, "ORT_DISABLE_ALL")
    for m in models:
        for level in (None, "ORT_DISABLE_ALL"):
            print(json.dumps({"model": m, "session": level or "default", "images": len(feeds),
                              "mask_logits_sqnr_db": round(sqnr_db(ref, run(m, level)), 2),
                              "cpu_flags": cpu_flags()}), flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["build", "measure", "full"])
    p.add_argument("models", nargs="*")
    p.add_argument("--dir", type=Path)
    p.add_argument("--fp", type=Path)
    p.add_argument("--dataset", type=Path)
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--feeds", type=int, default=3, help="measure: random decoder feeds (default 3)")
    p.add_argument("--formats", default=",".join(FORMATS), help="measure: comma-separated formats")
    a = p.parse_intermixed_args()
    if a.what == "full":
        full(a.fp, a.dataset, a.models, a.images)
    else:
        build(a.dir) if a.what == "build" else measure(a.dir, a.feeds, tuple(a.formats.split(",")))
