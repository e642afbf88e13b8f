"""COCO instance-segmentation metrics of box-prompted masks: segm mAP / AP50 / AP75 (pycocotools) and mean IoU.

- segm_mAP, AP50, AP75: COCOeval(iouType="segm") over the evaluated images, as percentages (0-100).
- mIoU (0-1): with ground-truth box prompts, the mean over prompted instances of IoU(predicted mask, that
  instance's mask). With detector prompts (no pairing), each non-crowd ground-truth instance takes the best IoU
  among the predicted masks of its image, 0 when there are none, and mIoU is their mean.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval

from ..data.coco import CocoDataset
from ..errors import InputError


@dataclass(frozen=True)
class Prediction:
    """One predicted instance mask, as COCO results carry it."""

    image_id: int
    category_id: int
    rle: dict                  # compressed RLE at the original image size (pycocotools.mask.encode)
    score: float
    ann_id: int | None = None  # the ground-truth instance whose box prompted it (None for detector prompts)


def encode_masks(masks: np.ndarray) -> list[dict]:
    """Boolean masks [k, H, W] -> compressed RLEs."""
    if masks.ndim != 3:
        raise ValueError(f"expected masks [k, H, W], got shape {masks.shape}")
    return mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))


def coco_segm_ap(dataset: CocoDataset, predictions: list[Prediction], image_ids: list[int]) -> dict[str, float]:
    """{"segm_mAP", "AP50", "AP75"} in percent over `image_ids` (0 where nothing was predicted)."""
    gt = dataset.coco
    n_gt = len(gt.getAnnIds(imgIds=image_ids, iscrowd=False))
    if n_gt == 0:
        raise InputError(f"{dataset.annotations_path.name}: the evaluated images have no non-crowd instances")
    if not predictions:
        return {"segm_mAP": 0.0, "AP50": 0.0, "AP75": 0.0}
    results = [{"image_id": p.image_id, "category_id": p.category_id, "score": float(p.score),
                "segmentation": p.rle} for p in predictions]
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iouType="segm")
        ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [max(float(s), 0.0) * 100.0 for s in ev.stats[:3]]  # -1 means "no such instances" -> 0
    return {"segm_mAP": stats[0], "AP50": stats[1], "AP75": stats[2]}


def paired_ious(dataset: CocoDataset, predictions: list[Prediction]) -> np.ndarray:
    """IoU of each prediction with the ground-truth instance that prompted it (predictions with ann_id)."""
    out = []
    for p in predictions:
        if p.ann_id is None:
            raise ValueError("paired_ious needs predictions prompted by ground-truth boxes (ann_id set)")
        gt_rle = dataset.ann_rle(dataset.annotation(p.ann_id))
        out.append(float(mask_utils.iou([p.rle], [gt_rle], [0])[0, 0]))
    return np.asarray(out, dtype=np.float64)


def best_match_ious(dataset: CocoDataset, predictions: list[Prediction], image_ids: list[int]) -> np.ndarray:
    """For each non-crowd ground-truth instance of `image_ids`: the best IoU among its image's predictions."""
    by_image: dict[int, list[dict]] = {}
    for p in predictions:
        by_image.setdefault(p.image_id, []).append(p.rle)
    out = []
    for image_id in image_ids:
        anns = [a for a in dataset.annotations(image_id) if not a.get("iscrowd", 0)]
        if not anns:
            continue
        preds = by_image.get(image_id)
        if not preds:
            out.extend([0.0] * len(anns))
            continue
        gts = [dataset.ann_rle(a) for a in anns]
        ious = np.asarray(mask_utils.iou(preds, gts, [0] * len(gts)))
        out.extend(ious.reshape(len(preds), len(gts)).max(axis=0).tolist())
    return np.asarray(out, dtype=np.float64)


def mean_iou(dataset: CocoDataset, predictions: list[Prediction], image_ids: list[int]) -> float:
    """See the module docstring: paired with ground-truth prompts, best match with detector prompts."""
    if predictions and all(p.ann_id is not None for p in predictions):
        ious = paired_ious(dataset, predictions)
    else:
        ious = best_match_ious(dataset, predictions, image_ids)
    return float(ious.mean()) if ious.size else 0.0


def segm_metrics(dataset: CocoDataset, predictions: list[Prediction], image_ids: list[int]) -> dict[str, float]:
    """segm_mAP, AP50, AP75 (0-100) and mIoU (0-1)."""
    return {**coco_segm_ap(dataset, predictions, image_ids), "mIoU": mean_iou(dataset, predictions, image_ids)}
