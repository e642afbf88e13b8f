"""Splitting a full SAM graph at its image/prompt boundary: exact in ORT, every node on one side."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.checker
import onnx.parser
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_sam import tiny_sam_paths  # noqa: E402

from carsam_onnx.errors import ModelError  # noqa: E402
from carsam_onnx.runtime import OrtRuntime  # noqa: E402
from carsam_onnx.samgraph import find_boundary, split_full_model  # noqa: E402

SMALL = """
<ir_version: 10, opset_import: ["" : 21]>
g (float[1,3,4,4] image, float[1,2,2] point_coords, float[1,2] point_labels)
  => (float[1,2,16] low_res_masks, float[1,2] iou_predictions)
<float[2,3] w = {1.0, 0.5, -1.0, 2.0, 0.25, 3.0}, int64[3] shape = {1, 3, 16}>
{
  two = Constant<value = float {2.0}>()
  e = Mul(image, two)
  e2 = Reshape(e, shape)
  m = ReduceMax<keepdims = 0>(e)
  p3 = MatMul(point_coords, w)
  low_res_masks = MatMul(p3, e2)
  l2 = Mul(point_labels, two)
  iou_predictions = Add(l2, m)
}
"""


def _run(model, feeds):
    sess = OrtRuntime().session(model, "test")
    return sess.run(feeds)


def _feeds(rng, size=4, n=2):
    return {"image": rng.standard_normal((1, 3, size, size)).astype(np.float32),
            "point_coords": rng.uniform(0, size, (1, n, 2)).astype(np.float32),
            "point_labels": np.array([[2.0, 3.0] * (n // 2)], np.float32)}


def test_small_graph_split_is_exact():
    model = onnx.parser.parse_model(SMALL)
    onnx.checker.check_model(model)
    assert find_boundary(model) == ["e2", "m"]
    enc, dec, boundary = split_full_model(onnx.shape_inference.infer_shapes(model))
    onnx.checker.check_model(enc)
    onnx.checker.check_model(dec)
    assert [o.name for o in enc.graph.output] == ["e2", "m"] and [i.name for i in enc.graph.input] == ["image"]
    assert [i.name for i in dec.graph.input] == ["e2", "m", "point_coords", "point_labels"]
    # the constant serves both sides; everything else is on exactly one
    enc_ops = sorted(n.op_type for n in enc.graph.node)
    dec_ops = sorted(n.op_type for n in dec.graph.node)
    assert enc_ops == ["Constant", "Mul", "ReduceMax", "Reshape"]
    assert dec_ops == ["Add", "Constant", "MatMul", "MatMul", "Mul"]
    assert {t.name for t in enc.graph.initializer} == {"shape"} and {t.name for t in dec.graph.initializer} == {"w"}
    feeds = _feeds(np.random.default_rng(0))
    ref = _run(model, feeds)
    mid = _run(enc, {"image": feeds["image"]})
    out = _run(dec, {**mid, "point_coords": feeds["point_coords"], "point_labels": feeds["point_labels"]})
    for k in ref:
        np.testing.assert_array_equal(out[k], ref[k])


QDQ = """
<ir_version: 10, opset_import: ["" : 21]>
g (float[1,3,4,4] image, float[1,2,2] point_coords, float[1,2] point_labels)
  => (float[1,2,16] low_res_masks, float[1,2] iou_predictions)
<int8[2,3] wq = {100, 50, -100, 127, 25, -3}, float wsc = {0.02}, int64[3] shape = {1, 3, 16},
 float asc = {0.05}, uint8 azp = {128}>
{
  two = Constant<value = float {2.0}>()
  e = Mul(image, two)
  e2 = Reshape(e, shape)
  e2q = QuantizeLinear(e2, asc, azp)
  e2d = DequantizeLinear(e2q, asc, azp)
  m = ReduceMax<keepdims = 0>(e)
  w = DequantizeLinear(wq, wsc)
  p3 = MatMul(point_coords, w)
  low_res_masks = MatMul(p3, e2d)
  l2 = Mul(point_labels, two)
  iou_predictions = Add(l2, m)
}
"""


def test_qdq_graph_split_keeps_qdq_semantics():
    model = onnx.shape_inference.infer_shapes(onnx.parser.parse_model(QDQ))
    onnx.checker.check_model(model)
    enc, dec, boundary = split_full_model(model)
    assert boundary == ["e2d", "m"]  # the activation Q/DQ pair stays with the image side, the weight DQ with the prompt side
    assert sorted(n.op_type for n in dec.graph.node).count("DequantizeLinear") == 1
    feeds = _feeds(np.random.default_rng(2))
    ref = _run(model, feeds)
    mid = _run(enc, {"image": feeds["image"]})
    out = _run(dec, {**mid, "point_coords": feeds["point_coords"], "point_labels": feeds["point_labels"]})
    for k in ref:
        np.testing.assert_array_equal(out[k], ref[k])


def test_graph_where_image_never_meets_prompts_is_refused():
    text = SMALL.replace("low_res_masks = MatMul(p3, e2)", "low_res_masks = MatMul(p3, shape_f)") \
                .replace("iou_predictions = Add(l2, m)", "iou_predictions = Identity(l2)") \
                .replace("int64[3] shape = {1, 3, 16}>", "int64[3] shape = {1, 3, 16}, float[1,3,16] shape_f = "
                         "{" + ", ".join(["1.0"] * 48) + "}>")
    model = onnx.parser.parse_model(text)
    with pytest.raises(ModelError, match="no value of the graph depends on the image alone"):
        split_full_model(model)
    bad = onnx.parser.parse_model(SMALL.replace("point_labels)\n", "labels)\n").replace("Mul(point_labels", "Mul(labels"))
    with pytest.raises(ModelError, match="needs inputs image, point_coords, point_labels"):
        split_full_model(bad)


def test_tiny_sam_split_matches_full_model():
    model = onnx.load(str(tiny_sam_paths()["full"]))
    enc, dec, boundary = split_full_model(model)
    # the encoder part carries the image encoder's weights, the prompt part the decoder's
    assert any("image_encoder" in n.name for n in enc.graph.node)
    assert not any("image_encoder" in n.name for n in dec.graph.node)
    rng = np.random.default_rng(1)
    for n in (2, 4):  # the prompt part keeps the dynamic number of points
        feeds = _feeds(rng, 128, n)
        ref = _run(model, feeds)
        mid = _run(enc, {"image": feeds["image"]})
        assert set(mid) == set(boundary)
        out = _run(dec, {**mid, "point_coords": feeds["point_coords"], "point_labels": feeds["point_labels"]})
        for k in ("low_res_masks", "iou_predictions"):
            np.testing.assert_array_equal(out[k], ref[k])
