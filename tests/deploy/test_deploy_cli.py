"""check-trt / build-engine / --provider / quantize --report / the official decoder export, through the CLI,
on the tiny SAM's decoder (calibrated on 2 images so that the many quantizations stay fast)."""
from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from carsam_onnx.cli import main
from tiny_sam import tiny_sam_paths

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
HAVE_CUDA_EP = "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.fixture(scope="module")
def tiny():
    return tiny_sam_paths()


@pytest.fixture(scope="module")
def emb(tmp_path_factory, tiny):
    """Image embeddings of 4 random images from the tiny encoder (enough for calibration + held-out)."""
    sess = ort.InferenceSession(str(tiny["encoder"]))
    rng = np.random.default_rng(0)
    e = np.concatenate([sess.run(None, {"image": rng.normal(size=(1, 3, 128, 128)).astype(np.float32)})[0]
                        for _ in range(4)])
    path = tmp_path_factory.mktemp("emb") / "emb.npz"
    np.savez(path, image_embeddings=e)
    return path


def _quantize(tiny, emb, out, *args, model="decoder"):
    argv = ["-q", "quantize", str(tiny[model]), "-o", str(out), "--embeddings", str(emb), "--num-calib", "2",
            "--force", *args]
    assert main(argv) == 0, argv
    return out


# Blocks are for 2-4-bit weights (config refuses --block-size with 5-8-bit weights; see
# tests/test_emitted_models_valid.py::test_ort_blocked_int8_canary), so w8a16 is checked per channel.
@pytest.mark.parametrize("bits,block", [("w8a8", None), ("w4a8", None), ("w4a16", None), ("w4a16", 32),
                                        ("w8a16", None), ("w4a4", 16)])
def test_check_trt_passes_every_trt_target_model(tiny, emb, tmp_path, capsys, bits, block):
    extra = ["--block-size", str(block)] if block else []
    q = _quantize(tiny, emb, tmp_path / "q.onnx", "--bits", bits, "--target", "trt", *extra)
    assert main(["check-trt", str(q)]) == 0
    assert "0 errors" in capsys.readouterr().out


def test_check_trt_fails_on_an_ort_asymmetric_model(tiny, emb, tmp_path, capsys):
    q = _quantize(tiny, emb, tmp_path / "q.onnx", "--bits", "w8a8", "--target", "ort")
    assert main(["check-trt", str(q)]) == 1
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("error: ")]
    assert lines and all("[quantized-type]" in ln or "[zero-point]" in ln for ln in lines)
    node_names = {n.name for n in onnx.load(str(q)).graph.node}
    assert all(ln.split(": ")[1] in node_names for ln in lines)      # each violation names its node


@pytest.mark.skipif(HAVE_TRT, reason="tensorrt is installed here; the missing-package exit cannot be exercised")
def test_build_engine_without_tensorrt_exits_2_with_a_hint(tiny, emb, tmp_path, capsys):
    q = _quantize(tiny, emb, tmp_path / "q.onnx", "--bits", "w8a8", "--target", "trt")
    assert main(["build-engine", str(q), "-o", str(tmp_path / "q.plan"), "--workspace", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "TensorRT is not installed" in err and "pip install" in err
    assert not (tmp_path / "q.plan").exists()


@pytest.mark.skipif(HAVE_CUDA_EP, reason="onnxruntime-gpu is installed here: --provider cuda is available")
def test_unavailable_provider_is_one_line_exit_2(tiny, emb, tmp_path, capsys):
    for argv in (["eval", str(tiny["full"]), "--dataset", str(tmp_path), "--provider", "cuda"],
                 ["predict", str(tiny["full"]), "x.png", "--box", "1", "1", "5", "5", "-o",
                  str(tmp_path / "m.png"), "--provider", "tensorrt"],
                 ["quantize", str(tiny["decoder"]), "-o", str(tmp_path / "q.onnx"), "--embeddings", str(emb),
                  "--provider", "cuda"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "--provider" in err and "onnxruntime-gpu" in err
    assert not (tmp_path / "q.onnx").exists()


def test_quantize_report_writes_valid_pngs_named_in_the_report(tiny, emb, tmp_path):
    _quantize(tiny, emb, tmp_path / "q.onnx", "--bits", "w4a8", "--report", str(tmp_path / "rep"))
    rep = tmp_path / "rep"
    text = (rep / "report.md").read_text()
    pngs = sorted(p.name for p in rep.glob("*.png"))
    assert pngs == ["activation_sqnr.png", "attention_dissipation.png", "attention_maps.png",
                    "masks_fp_vs_quantized.png", "weight_sqnr.png"]      # no MAC, no recon: no such PNGs
    for name in pngs:
        with Image.open(rep / name) as im:
            im.verify()
        with Image.open(rep / name) as im:
            assert im.format == "PNG" and min(im.size) >= 200
        assert f"]({name})" in text                       # embedded
    assert "*weight_sqnr.png: SQNR of each quantized weight" in text
    assert "*activation_sqnr.png: SQNR of each quantized activation" in text
    assert "*masks_fp_vs_quantized.png: for each held-out image" in text and "mask IoU, quantized vs FP" in text
    ious = [float(ln.split("|")[2]) for ln in text.splitlines() if ln.startswith("| 0000")]
    assert len(ious) == 2 and all(0.5 < v <= 1.0 for v in ious)    # W4A8 on the tiny model: close to FP
    assert main(["-q", "quantize", str(tiny["decoder"]), "-o", str(tmp_path / "q2.onnx"), "--embeddings",
                 str(emb), "--num-calib", "2", "--report", str(rep)]) == 2        # report.md exists: --force
    assert not (tmp_path / "q2.onnx").exists()


def test_official_decoder_export_quantizes_with_its_interface(tiny, emb, tmp_path, capsys):
    """segment-anything's SamOnnxModel export (opset 17) -> Q/DQ at opset 21, same inputs and outputs; its
    quantized masks stay close to the project's own decoder quantized the same way on the same weights."""
    off = _quantize(tiny, emb, tmp_path / "off.onnx", "--bits", "w8a8", "--method", "mse",
                    model="official_decoder")
    own = _quantize(tiny, emb, tmp_path / "own.onnx", "--bits", "w8a8", "--method", "mse")
    src, q = onnx.load(str(tiny["official_decoder"])), onnx.load(str(off))
    assert [i.name for i in q.graph.input] == [i.name for i in src.graph.input]
    assert [o.name for o in q.graph.output] == ["masks", "iou_predictions", "low_res_masks"]
    assert next(o.version for o in q.opset_import if o.domain == "") == 21
    assert sum(n.op_type == "QuantizeLinear" for n in q.graph.node) > 40
    e = np.load(emb)["image_embeddings"][3:4]
    pc, pl = np.array([[[20.0, 30.0], [100.0, 90.0]]], np.float32), np.array([[2.0, 3.0]], np.float32)
    feed = {"image_embeddings": e, "point_coords": pc, "point_labels": pl,
            "mask_input": np.zeros((1, 1, 32, 32), np.float32), "has_mask_input": np.zeros(1, np.float32),
            "orig_im_size": np.array([100.0, 150.0], np.float32)}
    fp_off = ort.InferenceSession(str(tiny["official_decoder"])).run(["low_res_masks"], feed)[0]
    q_off = ort.InferenceSession(str(off)).run(["low_res_masks"], feed)[0]
    snr = 10 * np.log10((fp_off ** 2).sum() / ((fp_off - q_off) ** 2).sum())
    assert snr > 15, snr                                  # W8A8 keeps the official decoder's output
    # predicted with, as an encoder + decoder pair
    img = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (100, 150, 3)).astype(np.uint8)).save(img)
    assert main(["predict", str(tiny["encoder"]), str(off), str(img), "--box", "10", "10", "90", "60", "-o",
                 str(tmp_path / "m.png")]) == 0
    assert main(["predict", str(tiny["encoder"]), str(own), str(img), "--box", "10", "10", "90", "60", "-o",
                 str(tmp_path / "m_own.png")]) == 0


def _box_feeds(emb, idx, rng, k=3):
    """Step-1 feeds of segment-anything's decoder export (no mask): k random boxes on each embedding in idx."""
    from carsam_onnx.samgraph import no_mask_inputs

    e = np.load(emb)["image_embeddings"]
    feeds = []
    for i in idx:
        for _ in range(k):
            x0, y0 = rng.uniform(0, 70, 2)
            w, h = rng.uniform(20, 55, 2)
            feeds.append({"image_embeddings": e[i:i + 1], "point_labels": np.array([[2.0, 3.0]], np.float32),
                          "point_coords": np.array([[[x0, y0], [x0 + w, y0 + h]]], np.float32),
                          **no_mask_inputs(128, (100, 150))})
    return feeds


def test_official_decoder_is_calibrated_with_a_mask_input_too(tiny, emb, tmp_path, capsys):
    """SAM's refinement step (the previous low-res logits back as mask_input, has_mask_input 1) is calibrated:
    every prompt gets its refinement feed, the sites downstream of the dense prompt embedding get its statistics,
    and the quantized decoder at has_mask_input 1 agrees with the FP decoder on unseen embeddings."""
    from carsam_onnx.calib.baseline import calibrate_baseline
    from carsam_onnx.calib.feeds import build_feeds, mask_refinement_feeds
    from carsam_onnx.calib.mac import split_feeds
    from carsam_onnx.config import BitWidths, QuantConfig
    from carsam_onnx.modelio import load_model
    from carsam_onnx.qmath import sqnr_db
    from carsam_onnx.quantize import _plan, calibration_samples

    cfg = QuantConfig(bits=BitWidths.parse("w8a8"), method="minmax", num_calib=2)
    model, plan, _ = _plan(load_model(tiny["official_decoder"]), cfg)
    calib, _ = calibration_samples(cfg, 128, None, None)
    feeds = build_feeds(model, calib, embeddings=emb)
    assert len(feeds) == 4 and [float(f["has_mask_input"][0]) for f in feeds] == [0, 1, 0, 1]
    fp = ort.InferenceSession(str(tiny["official_decoder"]))
    for first, second in (feeds[0:2], feeds[2:4]):
        assert second["image_embeddings"] is first["image_embeddings"]
        np.testing.assert_allclose(second["mask_input"], fp.run(["low_res_masks"], first)[0], atol=1e-5)
        assert np.abs(second["mask_input"]).max() > 0
    fit, check = split_feeds(feeds, 0.25)                # MAC's fit/check split keeps an image's two feeds together
    assert len(fit) == 2 and len(check) == 2 and check[0]["image_embeddings"] is check[1]["image_embeddings"]
    # the refinement feeds reach the statistics: min-max ranges only widen, and do at sites fed by the dense
    # embedding; the first self-attention (the prompt tokens alone) is untouched
    art = {r: calibrate_baseline(model, plan, cfg, build_feeds(model, calib, embeddings=emb, mask_refinement=r))
           for r in (False, True)}
    changed = []
    for site in plan.activations:
        a, b = art[False].activations[site.value], art[True].activations[site.value]
        lo_a, lo_b = -a.scale * a.zero_point, -b.scale * b.zero_point   # the range's low end, to a step (rounded zp)
        assert b.scale >= a.scale * (1 - 1e-6) and lo_b <= lo_a + a.scale, site.value
        if not np.allclose(a.scale, b.scale):
            changed.append(site.value)
        if "layers.0/self_attn" in site.value:
            assert np.allclose(a.scale, b.scale), site.value
    with capsys.disabled():
        print(f"{len(changed)} of {len(plan.activations)} activation sites widened by the refinement feeds")
    assert len(changed) >= len(plan.activations) // 3, changed
    # through the CLI: W8A8, then SAM's two steps on embeddings calibration never saw
    off = tmp_path / "off.onnx"
    assert main(["quantize", str(tiny["official_decoder"]), "-o", str(off), "--embeddings", str(emb),
                 "--num-calib", "2", "--bits", "w8a8", "--method", "minmax"]) == 0
    assert "low_res_masks (mask input)" in capsys.readouterr().out          # held-out SQNR of the refinement step
    off0 = tmp_path / "off0.onnx"                                       # switched off: the no-mask feeds only
    assert main(["-q", "quantize", str(tiny["official_decoder"]), "-o", str(off0), "--embeddings", str(emb),
                 "--num-calib", "2", "--bits", "w8a8", "--method", "minmax", "--no-calib-mask-input"]) == 0
    assert off0.read_bytes() != off.read_bytes()
    step1 = _box_feeds(emb, [2, 3], np.random.default_rng(4))
    step2 = mask_refinement_feeds(str(tiny["official_decoder"]), step1)
    q = ort.InferenceSession(str(off))
    assert [i.name for i in q.get_inputs()] == [i.name for i in fp.get_inputs()]
    for step, floor in ((step1, 25.0), (step2, 25.0)):
        ref = [fp.run(["low_res_masks"], f)[0] for f in step]
        got = [q.run(["low_res_masks"], f)[0] for f in step]
        snr = sqnr_db(np.concatenate([r.ravel() for r in ref]), np.concatenate([g.ravel() for g in got]))
        iou = np.mean([np.logical_and(r > 0, g > 0).sum() / max(np.logical_or(r > 0, g > 0).sum(), 1)
                       for r, g in zip(ref, got)])
        print(f"{'step 2 (mask input)' if step is step2 else 'step 1 (no mask)'}: SQNR {snr:.2f} dB, IoU {iou:.4f}")
        assert snr > floor and iou > 0.95, (snr, iou)


def test_report_images_sets_the_reports_prompts_and_leaves_the_model_alone(tiny, tmp_path):
    """--report-images 5: the report measures on 5 held-out prompts (their masks table lists 5, the figure draws
    the first 4) while the quantized model is byte for byte the one made without a report."""
    def quantize(out, *args):
        assert main(["-q", "quantize", str(tiny["full"]), "-o", str(out), "--num-calib", "2", "--bits", "w8a8",
                     "--method", "minmax", *args]) == 0
        return out
    plain = quantize(tmp_path / "p.onnx")
    more = quantize(tmp_path / "m.onnx", "--report", str(tmp_path / "rep"), "--report-images", "5")
    assert more.read_bytes() == plain.read_bytes()
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "over 5 held-out inputs" in text                                  # the activation SQNR section
    masks = text.split("## Masks: FP vs quantized", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in masks.splitlines() if ln.startswith("| ") and "mask IoU" not in ln]
    assert len(rows) == 5 and "each of the first 4 (of 5" in masks and "over the 5 held-out prompts" in masks


def test_quantize_report_of_a_method_compares_against_its_calibrator(tiny, emb, tmp_path):
    """--method carsam / recon pass the calibrator artifact they start from to the report: the attention
    dissipation section then has three runs (FP, calibrator only, this run), and the loss curves are drawn;
    --report-compare adds an earlier run's curves (recon, unit by unit, against carsam's joint units), and
    carsam's Q.K^T section is MAC's own record."""
    earlier, rep = tmp_path / "recon", tmp_path / "rep"
    _quantize(tiny, emb, tmp_path / "r.onnx", "--bits", "w4a8", "--method", "recon", "--recon-iters", "2",
              "--report", str(earlier))
    _quantize(tiny, emb, tmp_path / "q.onnx", "--bits", "w4a8", "--method", "carsam", "--recon-iters", "2",
              "--report", str(rep), "--report-compare", str(earlier))
    text = (rep / "report.md").read_text()
    section = text.split("ttention dissipation", 1)[1]
    assert "calibrator only (mse" in section                   # the baseline's label: the calibrator and its bits
    assert (rep / "recon_loss_curves.png").is_file() and (earlier / "recon_units.json").is_file()
    curves = text.split("## Reconstruction loss per unit", 1)[1]
    runs = {ln.split("|")[2].strip() for ln in curves.splitlines() if ln.startswith("| `")}
    assert runs == {"carsam (MAC, JCAR attn)", "recon"}        # this run against the one-by-one run it names
    assert "its members reconstructed one by one (decoder_joint_attn[0]" in curves
    assert "- MAC: 7 attention sites (0 skipped), steps " in text       # the summary (tiny SAM's decoder)
    mac = text.split("## Q.K^T error before and after MAC", 1)[1]   # MAC's own record: reconstruction followed
    assert (rep / "qk_error_mac.png").is_file() and "on the calibration images MAC held back" in mac


def test_quantize_logs_stages_and_units_where_no_terminal_shows_bars(tiny, emb, tmp_path, capsys):
    """Without a terminal (a batch job's log) the bars are off; quantize then says each stage's end and each
    reconstructed unit on stderr, one timestamped line each. -q silences it."""
    argv = ["quantize", str(tiny["decoder"]), "-o", str(tmp_path / "q.onnx"), "--embeddings", str(emb),
            "--num-calib", "2", "--force", "--bits", "w4a8", "--method", "recon", "--recon-iters", "2"]
    assert main(argv) == 0
    err = capsys.readouterr().err.splitlines()
    units = [line for line in err if "] unit " in line]
    assert units and units[0].split("] unit ")[1].startswith("1/")
    assert all(" steps in " in line and "loss" in line for line in units)
    assert any("mse initialisation done" in line for line in err)
    assert any(line.endswith(" s") and "] calibration: " in line for line in err)
    assert main(["-q", *argv]) == 0
    assert "] unit " not in capsys.readouterr().err
