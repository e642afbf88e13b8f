"""The ORT quantize_static peer baseline (tools/ort_quantize_static.py) on the vit_b decoder (random init).

It must quantize exactly our plan's nodes, INT8 per output channel for weights and UINT8 per tensor for
activations, from the same calibration feeds (so its MinMax ranges equal our calibrator's), leave the
kept-float layers and the float consumers alone, and write a model ONNX Runtime runs close to FP.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

from carsam_onnx.qmath import sqnr_db
from carsam_onnx.config import BitWidths, QuantConfig
from carsam_onnx.errors import InputError
from carsam_onnx.passes.plan import plan_quantization

ROOT = Path(__file__).resolve().parents[2]
NUM_CALIB = 4


sys.path.insert(0, str(ROOT / "tools"))

import ort_quantize_static as tool  # noqa: E402



def _feed(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"image_embeddings": rng.normal(size=(1, 256, 64, 64)).astype(np.float32),
            "point_coords": np.array([[[200.0, 300.0], [700.0, 800.0]]], np.float32),
            "point_labels": np.array([[2.0, 3.0]], np.float32)}


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    from sam_models import sam_onnx_path

    path = sam_onnx_path("vit_b", "decoder", "dynamo")
    tmp = tmp_path_factory.mktemp("ortq")
    emb = tmp / "emb.npz"
    rng = np.random.default_rng(1)
    np.savez(emb, image_embeddings=rng.normal(size=(NUM_CALIB, 256, 64, 64)).astype(np.float32))
    return path, onnx.load(str(path)), emb, tmp


def _quantize(decoder, name, **kw):
    path, _, emb, tmp = decoder
    out = tmp / name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # built-in calibration set notice
        report = tool.ort_quantize_static(path, out, embeddings=emb, num_calib=NUM_CALIB, force=True, **kw)
    return out, onnx.load(str(out)), report


@pytest.fixture(scope="module")
def w8a8_minmax(decoder):
    return _quantize(decoder, "mm.onnx", calibrator="minmax")


def _producers(m):
    return {o: n for n in m.graph.node for o in n.output}


def test_w8a8_quantizes_the_plan_int8_per_channel_and_uint8_activations(decoder, w8a8_minmax):
    _, model, _, _ = decoder
    _, q, report = w8a8_minmax
    plan = plan_quantization(model, QuantConfig())
    # 2 two-way blocks (14 linears, 3 attentions) + final attention
    assert len(plan.weights) == 32 and len(plan.attention) == 7
    prod, inits = _producers(q), {t.name: t for t in q.graph.initializer}
    by_name = {n.name: n for n in q.graph.node}
    for s in plan.weights:
        dq = prod[by_name[s.node].input[1]]
        assert dq.op_type == "DequantizeLinear", s.node
        w, scale = inits[dq.input[0]], inits[dq.input[1]]
        assert w.data_type == TensorProto.INT8
        axis = next(a.i for a in dq.attribute if a.name == "axis")
        assert axis == s.axis and list(scale.dims) == [w.dims[s.axis]], s.node      # per output channel
    for a in plan.activations:
        for c in a.consumers:
            dq = prod[by_name[c].input[_slot(by_name[c], a.value, prod)]]
            assert dq.op_type == "DequantizeLinear", (c, a.value)
            assert inits[dq.input[2]].data_type == TensorProto.UINT8 and not inits[dq.input[1]].dims   # per tensor
    assert report.weights_quantized == len(plan.weights)
    assert report.activations_quantized == len(plan.activations)
    assert report.requested_left_float == []


def _slot(node, value, prod):
    """Index of the input of `node` that is the DQ of `value`."""
    for k, name in enumerate(node.input):
        p = prod.get(name)
        if p is not None and p.op_type == "DequantizeLinear" and prod.get(p.input[0]) is not None \
                and prod[p.input[0]].input[0] == value:
            return k
    raise AssertionError(f"{node.name} reads no quantized {value}")


def test_kept_float_layers_and_float_consumers_read_no_quantized_value(decoder, w8a8_minmax):
    _, model, _, _ = decoder
    _, q, report = w8a8_minmax
    plan = plan_quantization(model, QuantConfig())
    prod = _producers(q)
    by_name = {n.name: n for n in q.graph.node}
    kept = [n for n, _ in plan.kept_float if n in by_name]
    assert len(kept) >= 10                     # hypernetwork MLPs, IoU head, upscaling, prompt encoder
    for n in kept:
        assert all(prod.get(i) is None or prod[i].op_type != "DequantizeLinear" for i in by_name[n].input), n
    assert report.float_consumers_restored > 0       # ORT had rewired the decoder's residual Adds
    assert report.float_consumers_of_quantized == 0


def test_ort_rewiring_keeps_quantized_float_consumers(decoder):
    _, q, report = _quantize(decoder, "rewired.onnx", calibrator="minmax", ort_rewiring=True)
    assert report.float_consumers_restored == 0
    assert report.float_consumers_of_quantized > 0


def test_minmax_ranges_equal_our_calibrator_on_the_same_feeds(decoder, w8a8_minmax):
    """Same calibration feeds: ORT's MinMax scales and zero points equal those of our torch-side calibrator."""
    from carsam_onnx.calib.baseline import calibrate_baseline
    from carsam_onnx.calib.feeds import build_feeds, image_size
    from carsam_onnx.quantize import calibration_samples

    path, model, emb, _ = decoder
    _, q, _ = w8a8_minmax
    config = QuantConfig(num_calib=NUM_CALIB)
    plan = plan_quantization(model, config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calib, _ = calibration_samples(config, image_size(model), None, None)
    art = calibrate_baseline(model, plan, config, build_feeds(model, calib, embeddings=emb))
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    ort_q = {n.input[0]: n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits}
    assert set(ort_q) == set(art.activations)
    for v, ours in art.activations.items():
        scale, zp = float(inits[ort_q[v].input[1]]), int(inits[ort_q[v].input[2]])
        assert scale == pytest.approx(float(np.asarray(ours.scale)), rel=1e-4), v
        assert abs(zp - int(np.asarray(ours.zero_point))) <= 1, v


def test_w8a8_runs_in_ort_close_to_fp(decoder, w8a8_minmax):
    path, _, _, _ = decoder
    out, _, _ = w8a8_minmax
    feed = _feed(7)
    f = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)
    qs = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feed)
    for a, b in zip(f, qs):
        assert a.shape == b.shape
    # random-init vit_b decoder, W8A8 MinMax on 4 random embeddings: 29.3 dB on the masks, 41.8 dB on the IoU
    assert sqnr_db(f[0], qs[0]) > 25


def test_percentile_w4a4_uses_int4_types_and_clips_tighter_than_minmax(decoder, w8a8_minmax):
    path, _, _, _ = decoder
    out, q, report = _quantize(decoder, "pc_w4a4.onnx", calibrator="percentile", bits=BitWidths(4, 4), percentile=99.9)
    assert report.extra_options["CalibPercentile"] == pytest.approx(99.8)   # ORT's two-sided convention
    inits = {t.name: t for t in q.graph.initializer}
    w_types = {inits[n.input[0]].data_type for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    a_types = {inits[n.input[2]].data_type for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits}
    assert w_types == {TensorProto.INT4} and a_types == {TensorProto.UINT4}
    # percentile 99.9 clips: the activation ranges (scale x 15) are narrower than MinMax's (scale x 255)
    mm_inits = {t.name: numpy_helper.to_array(t) for t in w8a8_minmax[1].graph.initializer}
    mm = {n.input[0]: float(mm_inits[n.input[1]]) * 255 for n in w8a8_minmax[1].graph.node
          if n.op_type == "QuantizeLinear" and n.input[0] not in mm_inits}
    pc = {n.input[0]: float(numpy_helper.to_array(inits[n.input[1]])) * 15 for n in q.graph.node
          if n.op_type == "QuantizeLinear" and n.input[0] not in inits}
    narrower = sum(pc[v] < 0.99 * mm[v] for v in pc)
    assert narrower >= 0.8 * len(pc) and all(pc[v] <= mm[v] * 1.001 for v in pc)
    feed = _feed(7)
    f = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    b = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    assert b.shape == f.shape and np.isfinite(b).all()
    assert sqnr_db(f, b) > 8       # measured 14.6 dB (MinMax W4A4: 11.7 dB); a broken INT4 path gives <= 0 dB


def test_int4_weights_use_orts_scale_absmax_over_7_5(decoder):
    """ORT's INT4 weight grid (documented in the tool): zero point 0, scale = channel absmax / 7.5."""
    _, model, _, _ = decoder
    _, q, _ = _quantize(decoder, "mm_w4a8.onnx", calibrator="minmax", bits=BitWidths(4, 8))
    fp = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    checked = 0
    for s in plan_quantization(model, QuantConfig()).weights:
        dq = next(n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.output[0] in
                  {i for m in q.graph.node if m.name == s.node for i in m.input})
        absmax = np.abs(fp[s.initializer]).max(axis=1 - s.axis)
        np.testing.assert_allclose(inits[dq.input[1]], absmax / 7.5, rtol=1e-5)
        assert not inits[dq.input[2]].any()
        checked += 1
    assert checked == 32


def test_all_matmuls_also_quantizes_other_activation_matmuls(decoder, w8a8_minmax):
    """--all-matmuls: ORT takes every MatMul not kept float, so the mask head's hyper_in @ upscaled product
    (two computed inputs, no attention) gets both inputs quantized; by default it stays float (negative)."""
    _, model, _, _ = decoder
    plan = plan_quantization(model, QuantConfig())
    ours = {w.node for w in plan.weights} | {n for s in plan.attention for n in (s.qk_matmul, s.av_matmul)}
    kept = {n for n, _ in plan.kept_float}
    others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in ours | kept]
    assert others                               # the mask head product

    def reads_dq(q, name):
        prod = _producers(q)
        node = next(n for n in q.graph.node if n.name == name)
        return [prod.get(i) is not None and prod[i].op_type == "DequantizeLinear" for i in node.input[:2]]

    _, q_all, report = _quantize(decoder, "all.onnx", calibrator="minmax", all_matmuls=True)
    assert all(reads_dq(q_all, n) == [True, True] for n in others)
    assert report.activations_quantized > len(plan.activations)
    assert all(reads_dq(w8a8_minmax[1], n) == [False, False] for n in others)


@pytest.mark.parametrize("bits", ["w6a6", "w3a3", "w8a16"])
def test_bit_widths_quantize_static_cannot_express_are_refused_before_writing(decoder, bits):
    path, _, emb, tmp = decoder
    out = tmp / f"{bits}.onnx"
    with pytest.raises(tool.NotExpressible, match="not expressible"):
        tool.ort_quantize_static(path, out, "minmax", BitWidths.parse(bits), embeddings=emb, num_calib=NUM_CALIB)
    assert issubclass(tool.NotExpressible, InputError) and not out.exists()
    assert tool.expressible(BitWidths(4, 8)) and not tool.expressible(BitWidths.parse(bits))


def test_cli_reports_errors_in_one_line(decoder, capsys):
    path, _, _, tmp = decoder
    assert tool.main([str(path), "-o", str(tmp / "x.onnx"), "--calibrator", "minmax", "--bits", "w3a3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ort_quantize_static: error:") and "\n" not in err
    assert tool.main([str(tmp / "missing.onnx"), "-o", str(tmp / "y.onnx"), "--calibrator", "minmax"]) == 2
    assert "model not found" in capsys.readouterr().err
