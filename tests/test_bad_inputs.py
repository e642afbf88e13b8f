"""Every command against bad input (issue 14, item 1): one line on stderr naming the problem, no traceback,
exit code 2, the input files unchanged (sha256), no output and no temporary file left in the output folder.

The table CASES has one row per bad input. A row: an id, the command line (`{in}` = the shared folder of
inputs, `{out}` = a fresh empty output folder per case), words the error line must contain, and optionally
files to put in the output folder first (they must survive unchanged) or a user to run as. Commands added
later (emit, predict, split, check-trt, build-engine) get their rows the same way, one line each.
test_count_bad_inputs counts the rows; docs/benchmarks.md quotes it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest

from cli_proc import NOBODY, CliRunner, run_real
from tiny_coco import write_coco
from tiny_sam import tiny_sam_paths

REFERENCE_CKPT = Path(__file__).resolve().parent.parent / "carsam_onnx" / "assets" / "reference_sam.pt"


@dataclass(frozen=True)
class Case:
    id: str
    cmd: str                         # command line after `carsam-onnx`, with {in} and {out}
    words: tuple[str, ...] = ()      # the one error line contains each of these
    pre: dict = field(default_factory=dict)   # output-folder entries made first: name -> bytes, or None: a folder
    user: int | None = None          # run as this uid/gid (for "not writable": the tests run as root)
    readonly_out: bool = False       # chmod the output folder 0555 first


def C(id, cmd, *words, **kw):
    return Case(id, cmd, tuple(words), **kw)


Q = "quantize --calib-images {in}/calib --num-calib 1"              # a quantize that would otherwise succeed
QF = Q + " {in}/full.onnx -o {out}/q.onnx"
E = "eval {in}/full.onnx"
EDS = E + " --images {in}/ds/images"
KEEP = {"keep.onnx": b"an existing output"}
PF = "predict {in}/full.onnx {in}/ds/images"                         # predict over a folder of 3 images

CASES: list[Case] = [
    # ---- export ----------------------------------------------------------------------------------------------
    C("export-ckpt-other-model-type", "export --model-type vit_b --checkpoint {in}/reference_sam.pt -o {out}/m.onnx",
      "does not fit --model-type vit_b", "reference_sam.pt"),
    C("export-ckpt-not-a-checkpoint", "export --model-type vit_b --checkpoint {in}/notes.txt -o {out}/m.onnx",
      "cannot read checkpoint", "notes.txt"),
    C("export-ckpt-truncated", "export --model-type reference --checkpoint {in}/truncated.pt -o {out}/m.onnx",
      "cannot read checkpoint", "truncated.pt"),
    C("export-ckpt-not-sam", "export --model-type reference --checkpoint {in}/not_sam.pt -o {out}/m.onnx",
      "does not fit", "missing"),
    C("export-ckpt-missing", "export --model-type vit_b --checkpoint {in}/nope.pth -o {out}/m.onnx", "not found", "nope.pth"),
    C("export-unknown-model-type", "export --model-type vit_x --random-init -o {out}/m.onnx", "vit_x"),
    C("export-output-exists", "export --model-type reference -o {out}/keep.onnx", "exists", "--force", pre=KEEP),
    C("export-output-is-folder", "export --model-type reference -o {out}/dir", "dir", "is a directory",
      pre={"dir": None}),
    C("export-output-under-file", "export --model-type reference -o {out}/afile/m.onnx", "afile", "is a file",
      pre={"afile": b"x"}),
    C("export-output-not-writable", "export --model-type reference -o {out}/m.onnx", "not writable",
      user=NOBODY, readonly_out=True),
    # ---- inspect ---------------------------------------------------------------------------------------------
    C("inspect-truncated-onnx", "inspect {in}/truncated.onnx", "truncated.onnx"),
    C("inspect-not-onnx", "inspect {in}/image.onnx", "image.onnx", "not"),
    C("inspect-empty-file", "inspect {in}/empty.onnx", "empty.onnx"),
    C("inspect-missing-external-data", "inspect {in}/ext/encoder.onnx", "encoder.onnx.data"),
    C("inspect-folder", "inspect {in}/calib", "calib"),
    # ---- quantize: the model ---------------------------------------------------------------------------------
    C("quantize-truncated-onnx", Q + " {in}/truncated.onnx -o {out}/q.onnx", "truncated.onnx"),
    C("quantize-not-onnx", Q + " {in}/image.onnx -o {out}/q.onnx", "image.onnx"),
    C("quantize-not-sam", Q + " {in}/not_sam.onnx -o {out}/q.onnx", "not a SAM graph"),
    C("quantize-old-opset", Q + " {in}/encoder_opset16.onnx -o {out}/q.onnx", "opset 16", "17"),
    C("quantize-missing-external-data", Q + " {in}/ext/encoder.onnx -o {out}/q.onnx", "encoder.onnx.data"),
    C("quantize-recon-negative-lr", Q + " {in}/full.onnx -o {out}/q.onnx --method recon --recon-round-lr -1",
      "--recon-round-lr", ">= 0"),
    C("quantize-recon-infinite-lr", Q + " {in}/full.onnx -o {out}/q.onnx --method recon --recon-scale-lr inf",
      "--recon-scale-lr inf", "finite"),
    C("quantize-recon-decoder-factor-zero", Q + " {in}/full.onnx -o {out}/q.onnx --method recon "
      "--recon-decoder-factor 0", "--recon-decoder-factor 0", ">= 1"),
    # ---- emit, split, check-trt, predict --------------------------------------------------------------------
    C("emit-calibration-not-a-calibration", "emit {in}/full.onnx --calibration {in}/notes.txt -o {out}/q.onnx",
      "notes.txt"),
    C("emit-calibration-empty", "emit {in}/full.onnx --calibration {in}/empty.onnx -o {out}/q.onnx", "empty.onnx",
      "not a readable carsam-onnx calibration file"),
    C("emit-output-is-model", "emit {in}/full.onnx --calibration {in}/notes.txt -o {in}/full.onnx --force",
      "also an input"),
    C("emit-output-is-calibration", "emit {in}/full.onnx --calibration {in}/notes.txt -o {in}/notes.txt --force",
      "also an input"),
    C("split-truncated-onnx", "split {in}/truncated.onnx -o {out}/s.onnx", "truncated.onnx"),
    C("check-trt-not-onnx", "check-trt {in}/image.onnx", "image.onnx"),
    C("predict-not-onnx", "predict {in}/image.onnx {in}/ds/images/000000000100.png --box 1 1 9 9 -o {out}/m.png",
      "image.onnx"),
    C("predict-corrupt-image", "predict {in}/full.onnx {in}/calib_corrupt/corrupt.png --box 1 1 9 9 -o {out}/m.png",
      "corrupt.png"),
    C("predict-output-is-image", "predict {in}/full.onnx {in}/ds/images/000000000100.png --box 1 1 9 9 "
      "-o {in}/ds/images/000000000100.png --force", "also an input"),
    C("predict-overlay-is-output", "predict {in}/full.onnx {in}/ds/images/000000000100.png --box 1 1 9 9 "
      "-o {out}/m.png --overlay {out}/m.png", "same file"),
    C("predict-device-not-a-device", "predict {in}/full.onnx {in}/ds/images/000000000100.png --box 1 1 9 9 "
      "-o {out}/m.png --runtime torch --device gpu", "not a device"),
    C("predict-threads-zero", "predict {in}/full.onnx {in}/ds/images/000000000100.png --box 1 1 9 9 "
      "-o {out}/m.png --threads 0", "--threads 0", "must be >= 1"),
    # ---- predict over a folder of images (PF: a folder predict that would otherwise succeed) ---------------------
    C("predict-box-outside-image", "predict {in}/full.onnx {in}/ds/images/000000000100.png --box 1 1 400 90 "
      "-o {out}/m.png", "outside", "000000000100.png", "160 x 96"),
    C("predict-point-outside-image", "predict {in}/full.onnx {in}/ds/images/000000000100.png --point 170 5 "
      "-o {out}/m.png", "point (170.0, 5.0)", "outside"),
    C("predict-point-not-finite", "predict {in}/full.onnx {in}/ds/images/000000000100.png --point nan 5 "
      "-o {out}/m.png", "point", "finite"),
    C("predict-folder-box-outside-one-image", PF + " --box 1 1 130 90 -o {out}/masks", "000000000101.png",
      "outside", "100 x 150"),
    C("predict-folder-empty", "predict {in}/full.onnx {in}/empty_dir --box 1 1 9 9 -o {out}/masks", "empty_dir",
      "no image files"),
    C("predict-folder-no-images", "predict {in}/full.onnx {in}/no_images --box 1 1 9 9 -o {out}/masks", "no_images",
      "no image files"),
    C("predict-folder-corrupt-image", "predict {in}/full.onnx {in}/calib_corrupt --box 1 1 9 9 -o {out}/masks "
      "--overlay {out}/ov", "corrupt.png"),                       # found after 3 masks: they and the folders go
    C("predict-folder-output-is-file", PF + " --box 1 1 9 9 -o {out}/keep.onnx", "keep.onnx", "is a file",
      pre=KEEP),
    C("predict-folder-output-image-name", PF + " --box 1 1 9 9 -o {out}/mask.png", "-o", "output folder"),
    C("predict-folder-mask-exists", PF + " --box 1 1 9 9 -o {out}/masks", "000000000101.png", "exists", "--force",
      pre={"masks/000000000101.png": b"an earlier mask"}),
    C("predict-folder-overlay-is-output", PF + " --box 1 1 9 9 -o {out}/m --overlay {out}/m", "same folder"),
    C("predict-folder-output-is-input", PF + " --box 1 1 9 9 -o {in}/ds/images --force", "folder of input images"),
    C("predict-folder-no-prompts", PF + " -o {out}/masks", "--box", "--prompts"),
    C("predict-prompts-and-box", PF + " --prompts {in}/ds/annotations.json --box 1 1 9 9 -o {out}/masks", "not both"),
    C("predict-prompts-single-image", "predict {in}/full.onnx {in}/ds/images/000000000100.png --prompts "
      "{in}/ds/annotations.json -o {out}/m.png", "--prompts", "folder"),
    C("predict-prompts-unknown-file-name", PF + " --prompts {in}/cp_unknown.json -o {out}/masks", "elsewhere.png",
      "not an image in"),
    C("predict-prompts-unknown-image-id", PF + " --prompts {in}/ann_unknown_image.json -o {out}/masks",
      "image_id 999", "not an image in"),
    C("predict-prompts-box-outside", PF + " --prompts {in}/cp_outside.json -o {out}/masks", "outside",
      "000000000100.png"),
    C("predict-prompts-not-json", PF + " --prompts {in}/notes.txt -o {out}/masks", "notes.txt", "JSON"),
    # ---- quantize: calibration data --------------------------------------------------------------------------
    C("quantize-calib-no-images", "quantize {in}/full.onnx -o {out}/q.onnx --calib-images {in}/no_images",
      "no_images", "no images"),
    C("quantize-calib-empty-image", "quantize {in}/full.onnx -o {out}/q.onnx --calib-images {in}/calib_empty "
      "--num-calib 3", "empty.png"),
    C("quantize-calib-corrupt-image", "quantize {in}/full.onnx -o {out}/q.onnx --calib-images {in}/calib_corrupt "
      "--num-calib 3", "corrupt.png"),
    C("quantize-num-calib-beyond-memory", "quantize {in}/full.onnx -o {out}/q.onnx --num-calib 100000000",
      "--num-calib 100000000", "GiB available"),
    C("quantize-calib-coco-missing-keys", "quantize {in}/full.onnx -o {out}/q.onnx --calib-images {in}/ds_bad",
      "images[0] needs"),
    C("quantize-prompts-not-json", QF + " --calib-prompts {in}/notes.txt", "notes.txt", "JSON"),
    C("quantize-prompts-negative-box", QF + " --calib-prompts {in}/cp_negative.json", "empty bbox"),
    C("quantize-prompts-box-outside", QF + " --calib-prompts {in}/cp_outside.json", "outside"),
    C("quantize-prompts-unknown-image", QF + " --calib-prompts {in}/cp_unknown.json", "not in the calibration folder"),
    C("quantize-prompts-nan-box", QF + " --calib-prompts {in}/cp_nan.json", "non-finite"),
    C("quantize-decoder-without-embeddings", Q + " {in}/decoder.onnx -o {out}/q.onnx", "--encoder", "--embeddings"),
    C("quantize-embeddings-nan", Q + " {in}/decoder.onnx -o {out}/q.onnx --embeddings {in}/emb_nan.npz",
      "emb_nan.npz", "NaN"),
    C("quantize-embeddings-inf", Q + " {in}/decoder.onnx -o {out}/q.onnx --embeddings {in}/emb_inf.npz",
      "emb_inf.npz", "infinite"),
    C("quantize-embeddings-wrong-shape", Q + " {in}/decoder.onnx -o {out}/q.onnx --embeddings {in}/emb_shape.npz",
      "emb_shape.npz", "shape"),
    C("quantize-embeddings-not-npz", Q + " {in}/decoder.onnx -o {out}/q.onnx --embeddings {in}/notes.txt",
      "notes.txt"),
    C("quantize-encoder-is-decoder", Q + " {in}/decoder.onnx -o {out}/q.onnx --encoder {in}/decoder.onnx",
      "not a SAM image encoder"),
    C("quantize-bad-bits", QF + " --bits w9a8", "--bits"),
    C("quantize-bad-block-size", QF + " --block-size 20", "--block-size"),
    C("quantize-mac-lambda-zero", QF + " --method carsam --mac-lambda 0", "--mac-lambda", "> 0"),
    C("quantize-mac-lambda-nan", QF + " --method carsam --mac-lambda nan", "--mac-lambda"),
    C("quantize-smooth-above-one", QF + " --smooth 1.5", "--smooth", "[0, 1]"),
    C("quantize-smooth-nan", QF + " --smooth nan", "--smooth"),
    # ---- quantize: the output --------------------------------------------------------------------------------
    C("quantize-output-exists", Q + " {in}/full.onnx -o {out}/keep.onnx", "exists", "--force", pre=KEEP),
    C("quantize-output-is-folder", Q + " {in}/full.onnx -o {out}/dir", "is a directory", pre={"dir": None}),
    C("quantize-output-under-file", Q + " {in}/full.onnx -o {out}/afile/q.onnx", "is a file", pre={"afile": b"x"}),
    C("quantize-output-not-writable", QF, "not writable", user=NOBODY, readonly_out=True),
    C("quantize-output-is-input", Q + " {in}/full.onnx -o {in}/full.onnx --force", "also an input"),
    C("quantize-output-is-embeddings", Q + " {in}/decoder.onnx -o {in}/emb.npz --embeddings {in}/emb.npz --force",
      "also an input"),
    C("quantize-save-calibration-is-output", QF + " --save-calibration {out}/q.onnx", "--save-calibration",
      "output model's path"),
    C("quantize-seed-negative", QF + " --seed -1", "--seed -1"),
    C("quantize-device-not-a-device", QF + " --device gpu", "--device 'gpu'", "not a device"),
    C("quantize-device-other-type", QF + " --device mps", "--device mps", "cpu or cuda"),
    C("quantize-device-cuda-index", QF + " --device cuda:99", "--device cuda:99"),   # no GPU, or not 100 of them
    C("quantize-report-compare-without-report", QF + " --report-compare {in}/notes.txt", "--report-compare needs --report"),
    C("quantize-report-images-without-report", QF + " --report-images 4", "--report-images needs --report"),
    C("quantize-report-images-zero", QF + " --report {out}/rep --report-images 0", "--report-images 0", "1 to 64"),
    C("quantize-report-images-with-embeddings", Q + " {in}/decoder.onnx -o {out}/q.onnx --embeddings {in}/emb.npz"
      " --report {out}/rep --report-images 4", "--report-images", "--encoder"),
    C("quantize-report-compare-missing", QF + " --report {out}/rep --report-compare {in}/nowhere",
      "no recon_units.json", "nowhere"),
    C("quantize-report-compare-not-units", QF + " --report {out}/rep --report-compare {in}/notes.txt",
      "not a recon_units.json", "notes.txt"),
    # ---- eval: models ----------------------------------------------------------------------------------------
    C("eval-truncated-onnx", "eval {in}/truncated.onnx --dataset {in}/ds", "truncated.onnx"),
    C("eval-not-onnx", "eval {in}/image.onnx --dataset {in}/ds", "image.onnx"),
    C("eval-not-sam", "eval {in}/not_sam.onnx --dataset {in}/ds", "not a SAM graph"),
    C("eval-missing-external-data", "eval {in}/ext/encoder.onnx {in}/decoder.onnx --dataset {in}/ds",
      "encoder.onnx.data"),
    C("eval-two-encoders", "eval {in}/encoder.onnx {in}/encoder.onnx --dataset {in}/ds", "encoder"),
    # ---- eval: COCO annotations ------------------------------------------------------------------------------
    C("eval-ann-not-json", EDS + " --annotations {in}/notes.txt", "notes.txt", "not valid JSON"),
    C("eval-ann-missing-lists", EDS + " --annotations {in}/ann_no_lists.json", "'images' and 'annotations'"),
    C("eval-ann-image-missing-keys", EDS + " --annotations {in}/ann_image_keys.json", "images[0] needs"),
    C("eval-ann-annotation-missing-keys", EDS + " --annotations {in}/ann_ann_keys.json", "annotations[0] needs"),
    C("eval-ann-box-outside", EDS + " --annotations {in}/ann_box_outside.json", "outside"),
    C("eval-ann-box-negative", EDS + " --annotations {in}/ann_box_negative.json", "negative"),
    C("eval-ann-unknown-image-id", EDS + " --annotations {in}/ann_unknown_image.json", "image id 999"),
    C("eval-ann-duplicate-image-id", EDS + " --annotations {in}/ann_dup_image.json", "image id 100", "twice"),
    C("eval-ann-duplicate-annotation-id", EDS + " --annotations {in}/ann_dup_ann.json", "annotation id 1", "twice"),
    C("eval-ann-image-size-mismatch", EDS + " --annotations {in}/ann_size.json", "says"),
    C("eval-image-missing", E + " --images {in}/images_partial --annotations {in}/ds/annotations.json", "missing",
      "000000000101.png"),
    C("eval-image-empty", E + " --images {in}/images_empty --annotations {in}/ds/annotations.json", "000000000100.png"),
    C("eval-image-corrupt", E + " --images {in}/images_corrupt --annotations {in}/ds/annotations.json",
      "000000000100.png"),
    C("eval-dataset-no-annotations", E + " --dataset {in}/calib", "annotations.json"),
    # ---- eval: detection prompts -----------------------------------------------------------------------------
    C("eval-dets-not-json", E + " --dataset {in}/ds --prompts {in}/notes.txt", "notes.txt"),
    C("eval-dets-empty", E + " --dataset {in}/ds --prompts {in}/dets_empty.json", "no boxes"),
    C("eval-dets-no-box-for-images", E + " --dataset {in}/ds --limit 1 --prompts {in}/dets_other_image.json",
      "no boxes for"),
    C("eval-dets-below-min-score", E + " --dataset {in}/ds --min-score 0.9 --prompts {in}/dets_low.json", "score"),
    C("eval-dets-unknown-image", E + " --dataset {in}/ds --prompts {in}/dets_unknown.json", "not in"),
    C("eval-dets-box-outside", E + " --dataset {in}/ds --prompts {in}/dets_outside.json", "outside"),
    C("eval-dets-negative-box", E + " --dataset {in}/ds --prompts {in}/dets_negative.json", "empty bbox"),
    # ---- eval: the --json output -----------------------------------------------------------------------------
    C("eval-json-exists", E + " --dataset {in}/ds --json {out}/keep.onnx", "exists", "--force", pre=KEEP),
    C("eval-json-is-folder", E + " --dataset {in}/ds --json {out}/dir", "is a directory", pre={"dir": None}),
    C("eval-json-under-file", E + " --dataset {in}/ds --json {out}/afile/m.json", "is a file", pre={"afile": b"x"}),
    C("eval-json-is-annotations", E + " --dataset {in}/ds --json {in}/ds/annotations.json --force", "also an input"),
    C("eval-threads-zero", E + " --dataset {in}/ds --threads 0", "--threads 0", "must be >= 1"),
    C("eval-json-is-model", E + " --dataset {in}/ds --json {in}/full.onnx --force", "also an input"),
    C("eval-json-not-writable", E + " --dataset {in}/ds --json {out}/m.json", "not writable",
      user=NOBODY, readonly_out=True),
    # ---- data synth ------------------------------------------------------------------------------------------
    C("synth-output-not-empty", "data synth -o {out} --num-images 1 --seed 0", "not empty", "--force", pre=KEEP),
    C("synth-output-is-file", "data synth -o {out}/keep.onnx --num-images 1 --seed 0", "not a folder", pre=KEEP),
    C("synth-output-under-file", "data synth -o {out}/afile/set --num-images 1 --seed 0", "afile", "is a file",
      pre={"afile": b"x"}),
    C("synth-output-not-writable", "data synth -o {out}/set --num-images 1 --seed 0", "not writable",
      user=NOBODY, readonly_out=True),
    C("synth-zero-images", "data synth -o {out}/set --num-images 0 --seed 0", "--num-images"),
    C("synth-beyond-free-disk", "data synth -o {out}/set --num-images 100000000 --seed 0", "--num-images 100000000",
      "GiB free"),
    C("synth-image-too-small", "data synth -o {out}/set --num-images 1 --seed 0 --image-size 8", "--image-size 8", "32"),
    C("synth-image-too-large", "data synth -o {out}/set --num-images 1 --seed 0 --image-size 100000", "--image-size",
      "4096"),
    C("export-seed-out-of-range", "export --model-type reference --random-init --seed 99999999999999999999 "
      "-o {out}/m.onnx", "--seed"),
]


# ---- the shared inputs --------------------------------------------------------------------------------------
def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, (dict, list)):
        data = json.dumps(data)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def _not_sam_model() -> onnx.ModelProto:
    return onnx.parser.parse_model("""<ir_version: 10, opset_import: ["" : 21]>
        g (float[1, 8] x) => (float[1, 8] y) { y = Relu(x) }""")


def _make_inputs(root: Path) -> None:
    import torch

    tiny = tiny_sam_paths()
    for part in ("full", "encoder", "decoder", "official_decoder"):
        shutil.copy(tiny[part], root / f"{part}.onnx")
    full = (root / "full.onnx").read_bytes()
    _write(root / "truncated.onnx", full[: len(full) // 2])
    _write(root / "empty.onnx", b"")
    _write(root / "notes.txt", "these are notes, not a model, a checkpoint, JSON or an archive\n")
    onnx.save_model(_not_sam_model(), str(root / "not_sam.onnx"))
    enc = onnx.load(str(root / "encoder.onnx"))
    old = onnx.ModelProto()
    old.CopyFrom(enc)
    for imp in old.opset_import:         # claims an opset older than any converted (its LayerNorm needs 17)
        if imp.domain in ("", "ai.onnx"):
            imp.version = 16
    onnx.save_model(old, str(root / "encoder_opset16.onnx"))
    (root / "ext").mkdir()
    onnx.save_model(enc, str(root / "ext" / "encoder.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="encoder.onnx.data", size_threshold=1024)
    (root / "ext" / "encoder.onnx.data").unlink()
    # checkpoints
    shutil.copy(REFERENCE_CKPT, root / "reference_sam.pt")
    ck = REFERENCE_CKPT.read_bytes()
    _write(root / "truncated.pt", ck[: len(ck) // 3])
    torch.save({"encoder.weight": torch.zeros(4, 4)}, root / "not_sam.pt")
    # images and data sets
    images_dir, ann_path, _ = write_coco(root / "ds", num_images=3)
    shutil.copytree(images_dir, root / "calib")
    _write(root / "image.onnx", (images_dir / "000000000100.png").read_bytes())
    (root / "no_images").mkdir()
    (root / "empty_dir").mkdir()
    _write(root / "no_images" / "readme.txt", "no images here")
    for name, bad in (("calib_empty", b""), ("calib_corrupt", None)):
        shutil.copytree(images_dir, root / name)
        png = (images_dir / "000000000100.png").read_bytes()
        _write(root / name / ("empty.png" if bad == b"" else "corrupt.png"), bad if bad is not None else png[:80])
    shutil.copytree(images_dir, root / "images_partial")
    (root / "images_partial" / "000000000101.png").unlink()
    for name in ("images_empty", "images_corrupt"):
        shutil.copytree(images_dir, root / name)
        png = (images_dir / "000000000100.png").read_bytes()
        _write(root / name / "000000000100.png", b"" if name == "images_empty" else png[:80])
    good = json.loads(ann_path.read_text())

    def ann(name, mutate):
        data = json.loads(json.dumps(good))
        mutate(data)
        _write(root / name, data)

    ann("ann_no_lists.json", lambda d: d.pop("annotations"))
    ann("ann_image_keys.json", lambda d: d["images"][0].pop("height"))
    ann("ann_ann_keys.json", lambda d: d["annotations"][0].pop("segmentation"))
    ann("ann_box_outside.json", lambda d: d["annotations"][0].update(bbox=[500.0, 400.0, 30.0, 20.0]))
    ann("ann_box_negative.json", lambda d: d["annotations"][0].update(bbox=[10.0, 10.0, -5.0, 8.0]))
    ann("ann_unknown_image.json", lambda d: d["annotations"][0].update(image_id=999))
    ann("ann_dup_image.json", lambda d: d["images"][1].update(id=100))
    ann("ann_dup_ann.json", lambda d: d["annotations"][1].update(id=1))
    ann("ann_size.json", lambda d: d["images"][0].update(height=97))
    shutil.copytree(root / "ds", root / "ds_bad")
    _write(root / "ds_bad" / "annotations.json", (root / "ann_image_keys.json").read_bytes())
    # detection / calibration prompts (image 100 is 160 x 96)
    box = {"image_id": 100, "category_id": 1, "bbox": [10.0, 10.0, 40.0, 30.0], "score": 0.5}
    cal = {"file_name": "000000000100.png", "bbox": [10.0, 10.0, 40.0, 30.0]}
    _write(root / "dets_empty.json", [])
    _write(root / "dets_other_image.json", [{**box, "image_id": 102}])
    _write(root / "dets_low.json", [box])
    _write(root / "dets_unknown.json", [{**box, "image_id": 999}])
    _write(root / "dets_outside.json", [{**box, "bbox": [150.0, 10.0, 40.0, 30.0]}])
    _write(root / "dets_negative.json", [{**box, "bbox": [10.0, 10.0, 40.0, -3.0]}])
    _write(root / "cp_negative.json", [{**cal, "bbox": [10.0, 10.0, -4.0, 30.0]}])
    _write(root / "cp_outside.json", [{**cal, "bbox": [10.0, 90.0, 40.0, 30.0]}])
    _write(root / "cp_unknown.json", [{**cal, "file_name": "elsewhere.png"}])
    _write(root / "cp_nan.json", json.dumps([{**cal, "bbox": [float("nan"), 10.0, 40.0, 30.0]}]))
    # embeddings for the decoder (128 px model: 8 x 8 grid)
    emb = np.random.default_rng(0).standard_normal((3, 256, 8, 8)).astype(np.float32)
    np.savez(root / "emb.npz", image_embeddings=emb)
    for name, v in (("emb_nan.npz", np.nan), ("emb_inf.npz", np.inf)):
        bad = emb.copy()
        bad[0, 5, 2, 3] = v
        np.savez(root / name, image_embeddings=bad)
    np.savez(root / "emb_shape.npz", image_embeddings=emb[:, :, :, 0])
    # readable by the unprivileged user of the "not writable" cases
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o644)


def _hashes(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir():
            out[str(p.relative_to(root)) + "/"] = "dir"
    return out


@pytest.fixture(scope="module")
def world():
    base = Path(tempfile.mkdtemp(prefix="carsam-bad-inputs-"))
    os.chmod(base, 0o755)
    inputs = base / "in"
    inputs.mkdir()
    _make_inputs(inputs)
    runner = CliRunner()
    try:
        yield {"base": base, "in": inputs, "hashes": _hashes(inputs), "runner": runner, "n": [0]}
    finally:
        runner.close()
        shutil.rmtree(base, ignore_errors=True)


def _can_drop_privileges() -> str | None:
    if os.geteuid() != 0:
        return "not running as root, so a read-only folder cannot be tested through another user"
    if shutil.which("setpriv") is None:
        return "setpriv is not installed"
    return None


def run_case(world, case: Case):
    world["n"][0] += 1
    out = world["base"] / f"out{world['n'][0]}"
    out.mkdir()
    os.chmod(out, 0o777)
    for name, data in case.pre.items():
        (out / name).mkdir() if data is None else _write(out / name, data)
    if case.readonly_out:
        os.chmod(out, 0o555)
    before = _hashes(out)
    argv = shlex.split(case.cmd.format(**{"in": world["in"], "out": out}))
    res = world["runner"].run(argv, cwd=world["base"], uid=case.user)
    return res, out, before


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(world, case):
    if case.user is not None and (why := _can_drop_privileges()):
        pytest.skip(why)
    res, out, before = run_case(world, case)
    assert "Traceback" not in res.stderr, res.stderr
    assert res.rc == 2, (res.rc, res.stderr)
    assert len(res.err_lines) == 1, res.stderr
    line = res.err_lines[0]
    assert line.startswith(f"carsam-onnx {argv_command(case)}: error: "), line
    for w in case.words:
        assert w in line, (w, line)
    assert _hashes(out) == before, "the output folder changed (an output or a temporary file was left)"
    assert _hashes(world["in"]) == world["hashes"], "an input file changed"


def argv_command(case: Case) -> str:
    return case.cmd.split()[0]


def test_count_bad_inputs():
    """docs/benchmarks.md: "bad inputs tried N, handled cleanly N" counts these rows."""
    assert len(CASES) == len({c.id for c in CASES}) >= 30
    by_command = {}
    for c in CASES:
        by_command[argv_command(c)] = by_command.get(argv_command(c), 0) + 1
    print(f"bad inputs tried {len(CASES)}: {by_command}")
    assert set(by_command) >= {"export", "inspect", "quantize", "eval", "data"}   # every command has rows


SAMPLE = ("inspect-truncated-onnx", "eval-ann-duplicate-image-id")


def test_zygote_matches_real_interpreter(world):
    """The forked runner reports what a fresh `python -m carsam_onnx` reports (same exit code and stderr)."""
    for case in (c for c in CASES if c.id in SAMPLE):
        forked, out, _ = run_case(world, case)
        real = run_real(shlex.split(case.cmd.format(**{"in": world["in"], "out": out})), cwd=world["base"])
        assert (forked.rc, forked.stderr) == (real.rc, real.stderr)
