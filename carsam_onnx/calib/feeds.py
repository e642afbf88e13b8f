"""Model inputs for calibration and held-out checks: calibration samples -> feeds keyed by graph input names.

A full SAM graph takes image + prompt; an encoder takes the image; a decoder takes image embeddings
(from an encoder ONNX model run in ONNX Runtime, or an .npz file of precomputed embeddings) + prompt.
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
                embeddings: str | Path | None = None) -> list[dict[str, np.ndarray]]:
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
    return [{"image_embeddings": e, "point_coords": s.point_coords, "point_labels": s.point_labels, **extra}
            for e, s in zip(embs, samples)]
