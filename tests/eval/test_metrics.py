"""COCO segm AP and mIoU on predictions made by hand: perfect masks, shifted masks, detector-style sets."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_coco import write_coco  # noqa: E402

from carsam_onnx.data.coco import load_coco_dataset  # noqa: E402
from carsam_onnx.data.prompts import gt_box_prompts  # noqa: E402
from carsam_onnx.errors import InputError  # noqa: E402
from carsam_onnx.eval.metrics import (Prediction, best_match_ious, encode_masks, mean_iou,  # noqa: E402
                                      segm_metrics)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco") / "ds"
    write_coco(root, num_images=4, crowd=True)
    return load_coco_dataset(root)


def _predict(ds, transform, with_ann=True, score=0.9):
    preds = []
    for image_id, prompts in gt_box_prompts(ds).items():
        for p in prompts:
            ann = ds.annotation(p.ann_id)
            mask = transform(ds.ann_mask(ann))
            preds.append(Prediction(image_id, p.category_id, encode_masks(mask[None])[0], score,
                                    p.ann_id if with_ann else None))
    return preds


def _np_iou(a, b):
    return (a & b).sum() / (a | b).sum()


def test_perfect_masks_score_100(ds):
    preds = _predict(ds, lambda m: m)
    m = segm_metrics(ds, preds, ds.image_ids)
    assert m == pytest.approx({"segm_mAP": 100.0, "AP50": 100.0, "AP75": 100.0, "mIoU": 1.0})
    assert len(preds) == 8  # crowd regions are not prompted


def _shift(k):
    return lambda m: np.roll(m, k, axis=1)


def test_shifted_masks_score_lower_and_miou_is_exact(ds):
    preds = _predict(ds, _shift(6))
    m = segm_metrics(ds, preds, ds.image_ids)
    ious = [_np_iou(ds.ann_mask(ds.annotation(p.ann_id)), _shift(6)(ds.ann_mask(ds.annotation(p.ann_id))))
            for p in preds]
    assert m["mIoU"] == pytest.approx(float(np.mean(ious)), abs=1e-9)
    assert 0.3 < m["mIoU"] < 0.95 and m["segm_mAP"] < 90.0


def test_ap50_vs_ap75(ds):
    """Every mask at 0.5 < IoU < 0.75 with its instance: AP50 is perfect, AP75 is zero."""
    def shift_to_iou(m):
        for k in range(1, 60):
            s = np.roll(m, k, axis=1)
            if _np_iou(m, s) < 0.7:
                return s
        raise AssertionError("no shift found")
    preds = _predict(ds, shift_to_iou)
    ious = [_np_iou(ds.ann_mask(ds.annotation(p.ann_id)), shift_to_iou(ds.ann_mask(ds.annotation(p.ann_id))))
            for p in preds]
    assert all(0.5 < i < 0.75 for i in ious)
    m = segm_metrics(ds, preds, ds.image_ids)
    assert m["AP50"] == pytest.approx(100.0) and m["AP75"] == pytest.approx(0.0)
    assert 0 < m["segm_mAP"] < 50


def test_restricted_to_image_ids(ds):
    preds = [p for p in _predict(ds, lambda m: m) if p.image_id == 100]
    assert segm_metrics(ds, preds, [100])["segm_mAP"] == pytest.approx(100.0)
    # the same predictions over all images miss 6 instances: recall 25 %
    assert segm_metrics(ds, preds, ds.image_ids)["segm_mAP"] < 30.0


def test_detector_style_best_match(ds):
    """Without pairing, each ground-truth instance takes its best predicted mask; unmatched ones count 0."""
    preds = _predict(ds, lambda m: m, with_ann=False)
    assert mean_iou(ds, preds, ds.image_ids) == pytest.approx(1.0)
    half = [p for p in preds if p.image_id in (100, 101)]
    assert mean_iou(ds, half, ds.image_ids) == pytest.approx(0.5)
    ious = best_match_ious(ds, half, [100, 101])
    assert ious.shape == (4,) and np.allclose(ious, 1.0)


def test_no_predictions_and_no_instances(ds, tmp_path):
    assert segm_metrics(ds, [], ds.image_ids) == {"segm_mAP": 0.0, "AP50": 0.0, "AP75": 0.0, "mIoU": 0.0}
    import json
    root = tmp_path / "empty"
    write_coco(root, num_images=1)
    data = json.loads((root / "annotations.json").read_text())
    data["annotations"] = []
    (root / "annotations.json").write_text(json.dumps(data))
    empty = load_coco_dataset(root)
    with pytest.raises(InputError, match="no non-crowd instances"):
        segm_metrics(empty, [], empty.image_ids)
