"""Model inputs for calibration and held-out checks: calibration samples -> feeds keyed by graph input names.

A full SAM graph takes image + prompt; an encoder takes the image; a decoder takes image embeddings
(from an encoder ONNX model run in ONNX Runtime, or an .npz file of precomputed embeddings) + prompt.

segment-anything's own decoder export (kind official_decoder) also takes a mask: SAM's interactive refinement
sends the previous prediction's low-res logits back as ``mask_input`` with ``has_mask_input`` 1. Its calibration
therefore gets two feeds per prompt (mask_refinement_feeds): the "no mask" one (zeros, ``has_mask_input`` 0) and
the refinement one, whose ``mask_input`` is the FP model's ``low_res_masks`` of the first (the best mask by
predicted IoU when the export gives several, as SamPredictor's users pass it back). The mask path itself
(prompt_encoder.mask_downscaling) stays float under the default keep-float list; what the second feed gives real
statistics to is everything it changes downstream: the image stream (image embedding + dense prompt embedding)
into every two-way layer, and through the cross-attentions the token stream after the first self-attention.
The two feeds of one prompt share the embedding array (calib.mac.split_feeds keeps them on one side).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from ..data.prompts import CalibSample
from ..errors import CalibrationError, ModelError
from ..samgraph import inspect_sam_model, no_mask_inputs, sam_image_size


def model_kind(model: onnx.ModelProto, path: Path | None = None) -> str:
    """full | encoder | decoder | official_decoder (segment-anything's SamOnnxModel export), recognised by
    samgraph.inspect_sam_model."""
    return inspect_sam_model(model, path).kind


def image_size(model: onnx.ModelProto) -> int:
    return sam_image_size(inspect_sam_model(model))


def _embeddings_from_encoder(encoder: str | Path, samples: list[CalibSample]) -> list[np.ndarray]:
    from ..runtime import OrtRuntime
    from ..modelio import load_model

    if model_kind(load_model(encoder)) != "encoder":
        raise ModelError(f"--encoder {encoder} is not a SAM image encoder (input 'image' -> 'image_embeddings')")
    sess = OrtRuntime().session(Path(encoder), "encoder")
    return [next(iter(sess.run({"image": s.image}).values())) for s in samples]


def _embeddings_from_npz(path: str | Path, count: int) -> list[np.ndarray]:
    try:
        with np.load(path) as z:
            arr = z["image_embeddings"] if "image_embeddings" in z else z[z.files[0]]
    except Exception as e:
        raise CalibrationError(f"cannot read embeddings {path} ({type(e).__name__}); expected an .npz with "
                               "'image_embeddings' [K,256,H,W]") from None
    if arr.ndim != 4 or arr.shape[0] < count:
        raise CalibrationError(f"embeddings {path} have shape {arr.shape}; need [{count}, 256, H, W] (one per sample)")
    if not np.isfinite(arr).all():
        raise CalibrationError(f"embeddings {path} contain NaN or infinite values")
    return [arr[i : i + 1].astype(np.float32) for i in range(count)]


def build_feeds(model: onnx.ModelProto, samples: list[CalibSample], encoder: str | Path | None = None,
                embeddings: str | Path | None = None, mask_refinement: bool = True) -> list[dict[str, np.ndarray]]:
    """Feeds in sample order. segment-anything's decoder export: two per sample, the "no mask" feed and (unless
    `mask_refinement` is false) its mask-refinement feed right after it (module docstring)."""
    kind = model_kind(model)
    if kind == "encoder":
        return [{"image": s.image} for s in samples]
    if kind == "full":
        return [{"image": s.image, "point_coords": s.point_coords, "point_labels": s.point_labels} for s in samples]
    if encoder is None and embeddings is None:
        raise CalibrationError("a decoder-only model needs --encoder ENC.onnx or --embeddings FILE.npz "
                               "to make its calibration embeddings")
    embs = (_embeddings_from_encoder(encoder, samples) if encoder is not None
            else _embeddings_from_npz(embeddings, len(samples)))
    extra = no_mask_inputs(image_size(model)) if kind == "official_decoder" else {}   # SAM's "no mask" convention
    feeds = [{"image_embeddings": e, "point_coords": s.point_coords, "point_labels": s.point_labels, **extra}
             for e, s in zip(embs, samples)]
    if kind == "official_decoder" and mask_refinement:   # per prompt: no mask, then its refinement
        feeds = [f for pair in zip(feeds, mask_refinement_feeds(model, feeds)) for f in pair]
    return feeds


def mask_refinement_feeds(model: onnx.ModelProto | str | Path, feeds: list[dict]) -> list[dict[str, np.ndarray]]:
    """For segment-anything's decoder export: per feed, the feed SAM's interactive refinement sends next, the same
    prompt with ``mask_input`` = the FP `model`'s ``low_res_masks`` for that feed (the one with the highest
    ``iou_predictions`` when there are several) and ``has_mask_input`` 1. The embedding array is shared."""
    from ..runtime import OrtRuntime

    sess = OrtRuntime().session(model, "FP decoder")
    out = []
    for f in feeds:
        r = sess.run(f)
        low, iou = r["low_res_masks"], np.asarray(r["iou_predictions"]).reshape(-1)
        best = int(np.argmax(iou)) if low.shape[1] > 1 else 0
        mask = np.ascontiguousarray(low[:, best:best + 1], dtype=np.float32)
        if mask.shape != f["mask_input"].shape:
            raise ModelError(f"the decoder's low_res_masks {tuple(low.shape)} do not fit its mask_input "
                             f"{tuple(f['mask_input'].shape)}; not segment-anything's decoder export")
        out.append({**f, "mask_input": mask, "has_mask_input": np.ones((1,), np.float32)})
    return out
