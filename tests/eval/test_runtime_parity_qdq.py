"""ORT and the torch runtime agree on Q/DQ models (W8A8, W4A4 with INT4 containers): nearly the same masks,
scores and metrics (within 0.2 mAP) on the same prompts. The Q/DQ graphs are made here from the tiny SAM with
the project's own plan + emit passes and min/max ranges captured on one calibration image.

At 4-bit activations ORT has no integer kernels, and with its bias-rounding optimizer off (OrtRuntime) it
computes the graph's float Q/DQ simulation as the torch executor does: the masks are identical. At W8A8, ORT
runs DQ -> op -> Q groups as integer kernels (QLinearMatMul...) whose requantisation rounds a few values to
the neighbouring code (logits differ by <= 1.5e-3 of a 0.2 range on this model, against 2e-7 with ORT's
optimisations off). Random weights leave the mask logits near the threshold everywhere, which makes masks
very sensitive to that: the W8A8 thresholds are set for this worst case. The W8A8 graph uses the default integer
format (QuantConfig.int8_weights: UINT8 weights with zero point 128), with which ORT's integer kernels compute
the same on every x86 CPU; with full 8-bit weights, CPUs without VNNI saturate int16 pair sums (issue 9:
0.083 score difference)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from pycocotools import mask as mask_utils

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_coco import write_coco  # noqa: E402
from tiny_sam import tiny_sam_paths  # noqa: E402

from carsam_onnx.artifact import CalibrationArtifact  # noqa: E402
from carsam_onnx.torchexec.module import OnnxModule  # noqa: E402
from carsam_onnx.config import BitWidths, QuantConfig  # noqa: E402
from carsam_onnx.data.coco import load_coco_dataset  # noqa: E402
from carsam_onnx.data.prompts import load_calibration_set  # noqa: E402
from carsam_onnx.eval.metrics import segm_metrics  # noqa: E402
from carsam_onnx.deploy.engines import build_predictor  # noqa: E402
from carsam_onnx.eval.runner import run_predictions, select_prompts  # noqa: E402
from carsam_onnx.runtime import get_runtime  # noqa: E402
from carsam_onnx.qmath import activation_quant_from_range, weight_quant_from_minmax  # noqa: E402
from carsam_onnx.passes.emit import emit_qdq, target_options  # noqa: E402
from carsam_onnx.passes.plan import plan_quantization  # noqa: E402


def _qdq_model(path: Path, bits: BitWidths, calib_dir: Path, out: Path) -> Path:
    model = onnx.load(str(path))
    config = QuantConfig(bits=bits)
    plan = plan_quantization(model, config)
    assert plan.weights and plan.activations
    inits = {t.name: t for t in model.graph.initializer}
    weights = {s.initializer: weight_quant_from_minmax(numpy_helper.to_array(inits[s.initializer]), s.axis,
                                                       config.layer_weight_bits) for s in plan.weights}
    sample = load_calibration_set(calib_dir, None, num=1, seed=0, image_size=128)[0]
    values = [s.value for s in plan.activations]
    with torch.no_grad():
        got = OnnxModule(model).run({"image": sample.image, "point_coords": sample.point_coords,
                                     "point_labels": sample.point_labels}, capture=values)
    acts = {v: activation_quant_from_range(float(got[v].min()), float(got[v].max()), bits.activation, False)
            for v in values}
    q = emit_qdq(model, plan, CalibrationArtifact(activations=acts, weights=weights), **target_options(config))
    onnx.save(q, str(out))
    return out


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco") / "ds"
    write_coco(root, num_images=3)
    return load_coco_dataset(root)


@pytest.mark.parametrize("bits, score_tol, mean_agree, min_agree", [("w8a8", 3e-3, 0.97, 0.9),
                                                                     ("w4a4", 1e-5, 0.9999, 0.999)])
def test_ort_and_torch_agree_on_qdq(ds, tmp_path, bits, score_tol, mean_agree, min_agree):
    b = BitWidths.parse(bits)
    qpath = _qdq_model(tiny_sam_paths()["full"], b, ds.images_dir.parent, tmp_path / f"tiny_{bits}.onnx")
    q = onnx.load(str(qpath))
    ops = {n.op_type for n in q.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    if b.weight <= 4:
        assert any(t.data_type == onnx.TensorProto.INT4 for t in q.graph.initializer)
    by_image, ids, _ = select_prompts(ds, "gt", None)
    results = {}
    for rt in ("ort", "torch"):
        predictor = build_predictor(qpath, get_runtime(rt, "cpu"))
        results[rt], _ = run_predictions(predictor, ds, by_image, progress=False)
    agree = []
    for a, c in zip(results["ort"], results["torch"]):
        assert abs(a.score - c.score) < score_tol
        union = mask_utils.area(mask_utils.merge([a.rle, c.rle], intersect=False))
        agree.append(1.0 if union == 0 else float(mask_utils.iou([a.rle], [c.rle], [0])[0, 0]))
    assert np.mean(agree) > mean_agree and min(agree) > min_agree, np.round(agree, 4)
    m_ort, m_torch = segm_metrics(ds, results["ort"], ids), segm_metrics(ds, results["torch"], ids)
    for k in ("segm_mAP", "AP50", "AP75"):
        assert abs(m_ort[k] - m_torch[k]) <= 0.2
    assert abs(m_ort["mIoU"] - m_torch["mIoU"]) < 5e-3
    if b.activation <= 4:
        assert m_ort == pytest.approx(m_torch, abs=1e-6)
