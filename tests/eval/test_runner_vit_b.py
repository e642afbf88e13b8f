"""evaluate() on the real vit_b graph (random init, 1024 px): the encoder+decoder pair, the dynamo full graph
and the TorchScript full graph (both split at their image/prompt boundary) give the same result on one image.
Metrics of random weights are near 0: this checks plumbing, ranges and agreement, not quality."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sam_models import sam_onnx_path  # noqa: E402
from tiny_coco import write_coco  # noqa: E402

from carsam_onnx.data.coco import load_coco_dataset  # noqa: E402
from carsam_onnx.eval.runner import evaluate  # noqa: E402


@pytest.mark.slow
def test_vit_b_pair_and_full_graphs_agree(tmp_path):
    write_coco(tmp_path / "ds", num_images=1)
    ds = load_coco_dataset(tmp_path / "ds")
    runs = {
        "pair": [sam_onnx_path("vit_b", "encoder", "dynamo"), sam_onnx_path("vit_b", "decoder", "dynamo")],
        "full_dynamo": sam_onnx_path("vit_b", "full", "dynamo"),
        "full_torchscript": sam_onnx_path("vit_b", "full", "torchscript"),
    }
    results = {k: evaluate(m, ds, progress=False) for k, m in runs.items()}
    for name, r in results.items():
        d = r.to_json()
        assert r.image_size == 1024 and r.num_instances == 2 and r.num_images == 1, name
        assert 0 <= d["segm_mAP"] <= 100 and 0 <= d["AP50"] <= 100 and 0 <= d["AP75"] <= 100, name
        assert 0 <= d["mIoU"] <= 1, name
    assert "split at" in results["full_dynamo"].model and "split at" in results["full_torchscript"].model
    # same weights: the dynamo pair and the dynamo full graph compute the same masks
    for k in ("segm_mAP", "AP50", "AP75", "mIoU"):
        assert getattr(results["pair"], k) == pytest.approx(getattr(results["full_dynamo"], k), abs=1e-6)
    # the TorchScript graph computes the same function up to float rounding
    assert results["full_torchscript"].mIoU == pytest.approx(results["pair"].mIoU, abs=0.01)
