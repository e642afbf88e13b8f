"""`carsam-onnx quantize` end to end: what it writes, its quality floor, and how it refuses bad input."""
from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper
from PIL import Image

from carsam_onnx.cli import main
from carsam_onnx.config import BitWidths, QuantConfig
from carsam_onnx.passes.plan import plan_quantization
from carsam_onnx.passes.sites import WeightKind
from carsam_onnx.quantize import quantize
from sam_models import sam_onnx_path
from tiny_coco import write_coco
from tiny_sam import tiny_sam_paths


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(code, err, tmp_out, *words):
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], lines[0]
    assert not tmp_out.exists()
    assert not [p for p in tmp_out.parent.iterdir() if p.name.startswith("." + tmp_out.name)]  # no temp left


def dq_fed_weights(model: onnx.ModelProto) -> dict[str, int]:
    """weight-layer node -> data type of the initializer its weight DequantizeLinear reads (absent: float)."""
    inits = {t.name: t for t in model.graph.initializer}
    dq_src = {n.output[0]: inits[n.input[0]].data_type for n in model.graph.node
              if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    return {n.name: dq_src[n.input[1]] for n in model.graph.node
            if n.op_type in ("MatMul", "Gemm", "Conv", "ConvTranspose") and n.input[1] in dq_src}


# ------------------------------------------------------------------------------------------ quality floors
@pytest.mark.slow
def test_w8a8_minmax_vit_b_full(tmp_path):
    """Issue 4: W8A8 MinMax on a random-init vit_b full model runs in ORT, keeps >= 25 dB output SQNR on
    held-out prompts, and every weight layer outside the keep-float list reads an 8-bit initializer via DQ (the
    default integer format; issue 9: in a default ORT session on any x86 CPU)."""
    src = sam_onnx_path("vit_b", "full", "dynamo")
    out = tmp_path / "w8a8.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = quantize(src, out, QuantConfig(bits=BitWidths(8, 8), method="minmax", num_calib=2), progress=False)
    assert report.sqnr_db["low_res_masks"] >= 25.0, report.sqnr_db
    model = onnx.load(str(out))
    fp = onnx.load(str(src), load_external_data=False)
    plan = plan_quantization(fp, QuantConfig())
    layers = {w.node for w in plan.weights if w.kind != WeightKind.CONSTANT}
    fed = dq_fed_weights(model)
    assert layers and layers <= set(fed)
    # default integer format (QuantConfig.int8_weights "auto": UINT8 with zero point 128 for target ort)
    want = onnx.TensorProto.UINT8 if QuantConfig(bits=BitWidths(8, 8)).unsigned_weights else onnx.TensorProto.INT8
    assert all(fed[n] == want for n in layers)
    kept = {n for n, _ in plan.kept_float}
    assert not kept & set(fed)          # the keep-float layers stay float
    assert report.activations_by_kind["attn_probs"] == 19


@pytest.mark.slow
def test_w4_file_size_vit_b(tmp_path):
    """Issue 4: a W4 model (every weight layer at 4 bits: --keep-float matching nothing) is <= 0.14x the FP32
    file: INT4 is packed two values a byte. Position tables are INT8 (weight-only)."""
    src = sam_onnx_path("vit_b", "full", "dynamo")
    out = tmp_path / "w4.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = quantize(src, out, QuantConfig(bits=BitWidths(4, 16), keep_float=(), num_calib=1), progress=False)
    assert report.output_bytes <= 0.14 * report.input_bytes, (report.output_bytes, report.input_bytes)
    assert all(t == onnx.TensorProto.INT4 for t in dq_fed_weights(onnx.load(str(out))).values())


@pytest.mark.parametrize("bits", ["w4a4", "w4a16", "w3a3", "w6a6"])
def test_low_bit_decoder_models_run_in_ort(tmp_path, capsys, bits):
    """W4A4 / W4A16 (and the narrow grids) load and run in ORT on CPU; embeddings from an .npz."""
    src = tiny_sam_paths()["decoder"]
    emb = np.random.default_rng(0).standard_normal((8, 256, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "emb.npz", image_embeddings=emb)
    out = tmp_path / f"{bits}.onnx"
    code, stdout, err = run(capsys, "quantize", str(src), "-o", str(out), "--bits", bits, "--num-calib", "4",
                            "--embeddings", str(tmp_path / "emb.npz"))
    assert code == 0, err
    assert "output SQNR" in stdout and "attention sites: 7" in stdout
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    masks, iou = sess.run(None, {"image_embeddings": emb[:1], "point_coords": np.array([[[10, 20], [90, 100]]], np.float32),
                                 "point_labels": np.array([[2, 3]], np.float32)})
    assert masks.shape == (1, 1, 32, 32) and np.isfinite(masks).all()
    types = set(dq_fed_weights(onnx.load(str(out))).values())
    assert types == {onnx.TensorProto.INT4 if bits[1] in "34" else onnx.TensorProto.INT8}


def test_full_model_with_calibration_folder_and_prompts(tmp_path, capsys):
    images, ann, _ = write_coco(tmp_path / "set", num_images=3)
    src = tiny_sam_paths()["full"]
    out = tmp_path / "q.onnx"
    code, stdout, err = run(capsys, "quantize", str(src), "-o", str(out), "--bits", "w8a8", "--method", "percentile",
                            "--calib-images", str(tmp_path / "set"), "--num-calib", "2")
    assert code == 0, err
    sqnr = float(stdout.split("low_res_masks ")[1].split(" dB")[0])
    assert sqnr > 20, stdout   # 8-bit on a random-init tiny SAM: well above noise
    # the same images through a prompts file (detection results naming images by file name)
    coco = json.loads(ann.read_text())
    dets = [{"file_name": coco["images"][0]["file_name"], "bbox": coco["annotations"][0]["bbox"], "score": 0.9}]
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    out2 = tmp_path / "q2.onnx"
    code, _, err = run(capsys, "quantize", str(src), "-o", str(out2), "--bits", "w8a8", "--calib-images",
                       str(images), "--calib-prompts", str(tmp_path / "dets.json"), "--num-calib", "1")
    assert code == 0, err


# ------------------------------------------------------------------------------------------------ bad input
def test_refuses_non_onnx_and_truncated(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    out = tmp_path / "q.onnx"
    code, _, err = run(capsys, "quantize", str(bad), "-o", str(out))
    assert_refused(code, err, out, "bad.onnx")
    trunc = tmp_path / "trunc.onnx"
    trunc.write_bytes(tiny_sam_paths()["full"].read_bytes()[:50_000])
    code, _, err = run(capsys, "quantize", str(trunc), "-o", str(out))
    assert_refused(code, err, out, "trunc.onnx")


def _mlp_model(path):
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((32, 64)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((64, 16)).astype(np.float32), "w2")
    nodes = [helper.make_node("MatMul", ["image", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["image_embeddings"], name="fc2")]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, [1, 3, 32, 32])],
                          [helper.make_tensor_value_info("image_embeddings", onnx.TensorProto.FLOAT, [1, 3, 32, 16])],
                          [w1, w2])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.save(m, str(path))


def test_model_without_attention_warns_or_refuses(tmp_path, capsys):
    src = tmp_path / "mlp.onnx"
    _mlp_model(src)
    out = tmp_path / "q.onnx"
    code, stdout, err = run(capsys, "quantize", str(src), "-o", str(out), "--num-calib", "2")
    assert code == 0, err
    assert "warning: no attention block found" in err and out.exists()
    assert len(dq_fed_weights(onnx.load(str(out)))) == 2
    out2 = tmp_path / "q2.onnx"
    code, _, err = run(capsys, "quantize", str(src), "-o", str(out2), "--require-attention")
    assert_refused(code, err, out2, "no attention")


def test_refuses_bad_calibration_data(tmp_path, capsys):
    src = str(tiny_sam_paths()["full"])
    out = tmp_path / "q.onnx"
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(capsys, "quantize", src, "-o", str(out), "--calib-images", str(empty))
    assert_refused(code, err, out, "no images")

    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    (unreadable / "a.png").write_bytes(b"\x89PNG broken")
    code, _, err = run(capsys, "quantize", src, "-o", str(out), "--calib-images", str(unreadable))
    assert_refused(code, err, out, "a.png")

    nan = tmp_path / "nan"
    nan.mkdir()
    arr = np.full((64, 64, 3), 100.0, np.float32)
    arr[3, 3, 0] = np.nan
    np.save(nan / "a.npy", arr)
    code, _, err = run(capsys, "quantize", src, "-o", str(out), "--calib-images", str(nan))
    assert_refused(code, err, out, "NaN")

    ok = tmp_path / "ok"
    ok.mkdir()
    Image.fromarray(np.zeros((60, 80, 3), np.uint8)).save(ok / "000000000001.png")
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps([{"image_id": 1, "bbox": [50, 10, 100, 20], "score": 1.0}]))
    code, _, err = run(capsys, "quantize", src, "-o", str(out), "--calib-images", str(ok), "--calib-prompts", str(outside))
    assert_refused(code, err, out, "outside")
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps([{"image_id": 7, "bbox": [5, 5, 10, 10], "score": 1.0}]))
    code, _, err = run(capsys, "quantize", src, "-o", str(out), "--calib-images", str(ok), "--calib-prompts", str(unknown))
    assert_refused(code, err, out, "not in the calibration folder")


def test_refuses_bad_arguments_before_work(tmp_path, capsys):
    src = str(tiny_sam_paths()["full"])
    out = tmp_path / "q.onnx"
    for args, word in ((["--bits", "w9a8"], "weight bits"), (["--bits", "int8"], "wXaY"),
                       (["--method", "adaround"], "--method"), (["--block-size", "17"], "--block-size")):
        code, _, err = run(capsys, "quantize", src, "-o", str(out), *args)
        assert_refused(code, err, out, word)
    out.write_bytes(b"keep")
    code, _, err = run(capsys, "quantize", src, "-o", str(out))
    assert code == 2 and "exists" in err and out.read_bytes() == b"keep"
    dec = str(tiny_sam_paths()["decoder"])
    out.unlink()
    code, _, err = run(capsys, "quantize", dec, "-o", str(out))
    assert_refused(code, err, out, "--encoder")


def test_failure_after_writing_leaves_no_output(tmp_path, capsys, monkeypatch):
    """If the held-out check fails (ORT cannot run the result), the command fails and removes its output."""
    import carsam_onnx.quantize as q
    from carsam_onnx.errors import ModelError

    def broken(*args, **kwargs):
        raise ModelError("ONNX Runtime cannot load the quantized model: simulated")

    monkeypatch.setattr(q, "output_sqnr", broken)
    out = tmp_path / "q.onnx"
    code, _, err = run(capsys, "quantize", str(tiny_sam_paths()["full"]), "-o", str(out), "--num-calib", "1")
    assert_refused(code, err, out, "simulated")


def test_decoder_calibrated_through_an_encoder_model(tmp_path, capsys):
    """--encoder ENC.onnx: the decoder's calibration embeddings come from running the encoder in ORT; a model
    that is no encoder is refused."""
    paths = tiny_sam_paths()
    out = tmp_path / "dec.onnx"
    code, stdout, err = run(capsys, "quantize", str(paths["decoder"]), "-o", str(out), "--bits", "w8a8",
                            "--num-calib", "2", "--encoder", str(paths["encoder"]))
    assert code == 0, err
    assert float(stdout.split("low_res_masks ")[1].split(" dB")[0]) > 20
    out2 = tmp_path / "dec2.onnx"
    code, _, err = run(capsys, "quantize", str(paths["decoder"]), "-o", str(out2), "--encoder", str(paths["decoder"]))
    assert_refused(code, err, out2, "not a SAM image encoder")


def test_summary_says_what_mac_did_and_where_its_record_rose():
    """quantize's summary (and the report's) gives MAC's sites, steps and images, and says when sites end above
    the uncorrected model's check-image Q.K^T error (what --mac-scope all does on a deep encoder)."""
    from pathlib import Path

    from carsam_onnx.quantize import QuantizeReport

    r = QuantizeReport(Path("q.onnx"), {}, {}, {}, 0, {}, 1, 1)
    assert not any(x.startswith("MAC") for x in r.lines())
    r.mac = {"mac": "on", "mac_sites": "19", "mac_skipped_sites": "0", "mac_steps": "38 kept, 0 dropped",
             "mac_images": "24 fit, 8 check", "mac_check_rises": "0"}
    line = next(x for x in r.lines() if x.startswith("MAC"))
    assert line == "MAC: 19 attention sites (0 skipped), steps 38 kept, 0 dropped on 24 fit, 8 check images"
    r.mac["mac_check_rises"] = "7"
    assert "; 7 site(s) end with a higher check-image Q.K^T error" in next(x for x in r.lines() if x.startswith("MAC"))


def test_report_samples_from_a_folder_stay_out_of_the_calibration_draw(tmp_path):
    """--report-images N with --calib-images: the report's prompts are images the calibration draw does not hold
    (another draw, seed + 1, less the calibration images), and the calibration draw itself is untouched; with too
    few images left it says so and uses what there is."""
    from carsam_onnx.data.prompts import load_calibration_set
    from carsam_onnx.data.synth import write_synthetic_coco
    from carsam_onnx.quantize import calibration_samples, report_samples

    write_synthetic_coco(tmp_path / "ds", 6, 3, image_size=64)
    cfg = QuantConfig(num_calib=3, seed=1)
    calib, held = calibration_samples(cfg, 64, tmp_path / "ds", None)
    assert [s.source for s in calib] == [s.source for s in load_calibration_set(tmp_path / "ds", None, 5, 1, 64)[:3]]
    assert report_samples(cfg, 64, tmp_path / "ds", None, calib, held, len(held)) is held
    shown = report_samples(cfg, 64, tmp_path / "ds", None, calib, held, 3)
    names = [s.source for s in shown]
    assert len(names) == 3 == len(set(names)) and not set(names) & {s.source for s in calib}
    with pytest.warns(UserWarning, match="3 images outside the calibration set"):
        assert len(report_samples(cfg, 64, tmp_path / "ds", None, calib, held, 5)) == 3


CUDA_OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.02 GiB "
            "is free. Of the allocated memory 75.3 GiB is allocated by PyTorch, and 1.2 GiB is reserved by PyTorch but "
            "unallocated. If reserved but unallocated memory is large try setting "
            "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.")


CUDA_CALL_OOM = ("CUDA error: out of memory\nSearch for `cudaErrorMemoryAllocation' in https://docs.nvidia.com/cuda/"
                 "cuda-runtime-api/group__CUDART__TYPES.html for more information.\nCUDA kernel errors might be "
                 "asynchronously reported at some other API call, so the stacktrace below might be incorrect.")


def _accelerator_error(text):
    import torch

    cls = getattr(torch, "AcceleratorError", RuntimeError)    # torch >= 2.8; a RuntimeError before
    return cls(text)


@pytest.mark.parametrize("error", [lambda: __import__("torch").OutOfMemoryError(CUDA_OOM),
                                   lambda: _accelerator_error(CUDA_CALL_OOM), lambda: MemoryError()],
                         ids=["cuda-allocator", "cuda-call", "host"])
def test_memory_running_out_mid_calibration_is_one_line_and_leaves_nothing(capsys, tmp_path, monkeypatch, error):
    """A GPU (torch's OutOfMemoryError from its allocator, AcceleratorError from a CUDA call; both seen on an H100
    with the card filled by another process) or the host (MemoryError) running out of memory while calibrating:
    one line naming what was asked for and what to lower, exit 2, no output and no temporary file."""
    from carsam_onnx.torchexec import OnnxModule

    def oom(self, *a, **k):
        raise error()

    monkeypatch.setattr(OnnxModule, "run", oom)
    out = tmp_path / "q.onnx"
    code, _, err = run(capsys, "quantize", str(tiny_sam_paths()["full"]), "-o", str(out), "--num-calib", "1",
                       "--method", "minmax")
    assert_refused(code, err, out, "out of memory", "--num-calib")
    if "Tried" in err:
        assert "Tried to allocate 2.00 GiB" in err and "PYTORCH_CUDA_ALLOC_CONF" not in err
    if "CUDA error" in err:
        assert "(CUDA error: out of memory)" in err and "asynchronously" not in err


def test_an_unrelated_error_still_raises(tmp_path, monkeypatch):
    """Only memory running out is turned into a line; a bug keeps its traceback."""
    from carsam_onnx.torchexec import OnnxModule

    monkeypatch.setattr(OnnxModule, "run", lambda self, *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        main(["-q", "quantize", str(tiny_sam_paths()["full"]), "-o", str(tmp_path / "q.onnx"), "--num-calib", "1",
              "--method", "minmax"])
