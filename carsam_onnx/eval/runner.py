"""The evaluation loop: run an ONNX SAM model (FP or Q/DQ) over a COCO-format set with one box prompt per
instance and score it (COCO segm mAP / AP50 / AP75, mIoU).

The model runs through a runtime (runtime/: "ort", "torch" or a registered one) behind a box predictor
(predictors.py: a full model split at the image embedding, or an encoder + decoder pair).
"""
from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from ..config import EvalConfig
from ..data.coco import CocoDataset, load_coco_dataset
from ..data.preprocess import preprocess_image
from ..data.prompts import BoxPrompt, gt_box_prompts, load_detection_prompts
from ..deploy.engines import BoxPredictor, build_predictor
from ..deploy.predictor import SamOnnxPredictor, masks_at_original_size
from ..errors import InputError
from ..modelio import write_json
from ..runtime import Runtime, get_runtime
from ..runtime.ort_settings import host_isa_flags
from .metrics import Prediction, encode_masks, segm_metrics


# ---- evaluation -----------------------------------------------------------------------------------------------
@dataclass
class EvalResult:
    segm_mAP: float
    AP50: float
    AP75: float
    mIoU: float
    num_instances: int
    num_images: int
    prompts: str
    model: str
    runtime: str
    image_size: int
    timings: dict = field(default_factory=dict)      # medians and totals, seconds
    per_image: list = field(default_factory=list)    # {image_id, num_prompts, encoder_s, decoder_s, post_s}
    threads: int | None = None                       # the runtime's CPU threads as asked (None: its default)
    cpu_flags: str = ""                              # the host's x86 flags that pick ORT's kernels (ort_settings)

    def to_json(self) -> dict:
        return asdict(self)

    def write_json(self, path: str | Path, force: bool = True) -> Path:
        """Atomic write (temporary file in the target folder, then rename)."""
        return write_json(path, self.to_json(), force=force)

    def summary(self) -> str:
        return (f"segm mAP {self.segm_mAP:.2f}  AP50 {self.AP50:.2f}  AP75 {self.AP75:.2f}  mIoU {self.mIoU:.4f}  "
                f"({self.num_instances} instances, {self.num_images} images, {self.prompts} boxes)")


def select_prompts(dataset: CocoDataset, prompts: str | Path, limit: int | None,
                   min_score: float = 0.0) -> tuple[dict[int, list[BoxPrompt]], list[int], str]:
    """(prompts by image, evaluated image ids, label). Ground truth: the first `limit` images (by id) that have
    instances. Detector boxes: the first `limit` images of the set, with or without boxes (images the detector
    missed still count against recall)."""
    if str(prompts) == "gt":
        by_image = gt_box_prompts(dataset)
        ids = [i for i in dataset.image_ids if i in by_image][:limit]
        if not ids:
            raise InputError(f"{dataset.annotations_path.name} has no non-crowd instances to prompt")
        label = "gt"
    else:
        by_image = load_detection_prompts(prompts, dataset, min_score)
        ids = dataset.image_ids[:limit]
        label = Path(prompts).name
        if not any(i in by_image for i in ids):
            raise InputError(f"prompts file {prompts} has no boxes for the {len(ids)} images evaluated "
                             f"(ids {ids[0]}..{ids[-1]})" + (f" with score >= {min_score}" if min_score else ""))
    return {i: by_image[i] for i in ids if i in by_image}, ids, label


def run_predictions(predictor: SamOnnxPredictor | BoxPredictor, dataset: CocoDataset,
                    by_image: dict[int, list[BoxPrompt]], progress: bool = True) -> tuple[list[Prediction], list[dict]]:
    """Masks for every prompt: encoder once per image, all its boxes through the decoder. `predictor`: a
    deploy.SamOnnxPredictor (a BoxPredictor is wrapped in one): the same pre/postprocessing as `predict`.

    Two worker threads keep the model busy: one reads and preprocesses the next image, the other brings the last
    image's masks to the original size and encodes them, while the model runs (the same functions as `predict`,
    so the same masks; predictions keep the images' order)."""
    from tqdm.auto import tqdm

    if isinstance(predictor, BoxPredictor):
        predictor = SamOnnxPredictor.from_engine(predictor)
    ids = sorted(by_image)
    dataset.check_image_files(ids)

    def prepare(image_id: int):
        return preprocess_image(dataset.read_image(image_id), predictor.image_size)

    def finish(low: np.ndarray, geometry) -> tuple[list[dict], float]:
        t0 = time.perf_counter()
        return encode_masks(masks_at_original_size(low, geometry)), time.perf_counter() - t0

    done = []
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="eval") as pool:
        upcoming = pool.submit(prepare, ids[0]) if ids else None
        for k, image_id in enumerate(tqdm(ids, desc="eval", unit="img", disable=None if progress else True,
                                          leave=False)):
            tensor, geometry = upcoming.result()
            if k + 1 < len(ids):
                upcoming = pool.submit(prepare, ids[k + 1])
            predictor.set_preprocessed(tensor, geometry)
            low, scores = predictor.predict_low_res(boxes=np.array([p.box_xyxy for p in by_image[image_id]]))
            done.append((image_id, scores, dict(predictor.timings), pool.submit(finish, low, geometry)))
        preds: list[Prediction] = []
        per_image: list[dict] = []
        for image_id, scores, t, masks in done:
            rles, post_s = masks.result()
            prompts = by_image[image_id]
            for p, rle, q in zip(prompts, rles, scores):
                score = p.score if p.score is not None else float(q)
                preds.append(Prediction(image_id, p.category_id, rle, score, p.ann_id))
            per_image.append({"image_id": image_id, "num_prompts": len(prompts), "encoder_s": round(t["encoder_s"], 4),
                              "decoder_s": round(t["decoder_s"], 4), "post_s": round(post_s, 4)})
    return preds, per_image


def timing_summary(per_image: list[dict], total_s: float) -> dict:
    if not per_image:
        return {"total_s": round(total_s, 3)}
    n = sum(r["num_prompts"] for r in per_image)
    return {"total_s": round(total_s, 3),
            "encoder_s_median": round(statistics.median(r["encoder_s"] for r in per_image), 4),
            "decoder_s_per_prompt": round(sum(r["decoder_s"] for r in per_image) / max(n, 1), 4),
            "postprocess_s_per_prompt": round(sum(r["post_s"] for r in per_image) / max(n, 1), 4)}


def evaluate(model: str | Path | Sequence[str | Path], dataset: CocoDataset | str | Path,
             config: EvalConfig = EvalConfig(), *, runtime: str | Runtime | None = None, progress: bool = True,
             **overrides) -> EvalResult:
    """COCO segm mAP / AP50 / AP75 and mIoU of a SAM ONNX model with one box prompt per instance.

    `model`: a full model or an (encoder, decoder) pair. `dataset`: a CocoDataset or a dataset folder
    (annotations.json + images/). `config.prompts`: "gt" (ground-truth boxes; mask score = predicted IoU) or a
    COCO detection-results JSON (mask score = detector score). `runtime`: a registered name or a Runtime object;
    keyword `overrides` replace fields of `config`.
    """
    t_start = time.perf_counter()
    if isinstance(runtime, str):
        overrides["runtime"] = runtime
    config = replace(config, **overrides)
    if not isinstance(dataset, CocoDataset):
        dataset = load_coco_dataset(dataset)
    by_image, ids, label = select_prompts(dataset, config.prompts, config.limit, config.min_score)
    rt = (runtime if isinstance(runtime, Runtime)
          else get_runtime(config.runtime, config.device, provider=config.provider, threads=config.threads))
    predictor = SamOnnxPredictor.from_engine(build_predictor(model, rt))
    preds, per_image = run_predictions(predictor, dataset, by_image, progress)
    metrics = segm_metrics(dataset, preds, ids)
    return EvalResult(metrics["segm_mAP"], metrics["AP50"], metrics["AP75"], metrics["mIoU"], len(preds), len(ids),
                      label, predictor.description, getattr(rt, "name", type(rt).__name__), predictor.image_size,
                      timing_summary(per_image, time.perf_counter() - t_start), per_image,
                      threads=getattr(rt, "threads", None), cpu_flags=host_isa_flags())
