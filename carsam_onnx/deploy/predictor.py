"""SamOnnxPredictor: SAM as an edge application uses it, over ONNX models on any runtime.

    predictor = SamOnnxPredictor("sam.w8a8.onnx")              # full model (split at the image embedding)
    predictor = SamOnnxPredictor(["enc.onnx", "dec.onnx"])     # or an encoder + decoder pair (either order;
                                                               # the decoder may be segment-anything's own export)
    predictor.set_image(image)                                 # HxWx3 uint8 RGB: the encoder runs once
    out = predictor.predict(boxes=[[x0, y0, x1, y1]])          # one prompt per box
    out = predictor.predict(points=[[x, y]], labels=[1])       # one prompt of points
    out.masks, out.scores, out.low_res_logits                  # [k, H, W] bool at the original size, [k], [k, s, s]

Coordinates are original image pixels. Preprocessing and postprocessing are SamPredictor's (data/preprocess.py):
`eval` runs through this class too, so what `predict` writes is what `eval` scores.

Prompts follow SAM's ONNX convention: points labelled 1 (foreground) / 0 (background), a box as two corners
labelled 2 and 3 after the points, and a padding point (0, 0) labelled -1 when there is no box.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..data.preprocess import Geometry, postprocess_masks, preprocess_image, transform_coords
from ..data.prompts import BOX_LABELS
from ..errors import InputError
from ..runtime import get_runtime
from .engines import BoxPredictor, build_predictor

POST_CHUNK = 16   # full-size masks upscaled at a time (bounded memory)


@dataclass
class PromptResult:
    """Per prompt: masks at the original image size, predicted IoU, low-res logits [S/4 x S/4].
    multimask=False: masks [k, H, W], scores [k], low_res_logits [k, s, s] (the mask with the highest score);
    multimask=True: every mask the model gives, [k, M, H, W], [k, M], [k, M, s, s]."""

    masks: np.ndarray
    scores: np.ndarray
    low_res_logits: np.ndarray


def encode_prompts(geo: Geometry, boxes=None, points=None, labels=None) -> tuple[np.ndarray, np.ndarray]:
    """Prompts in original pixels -> (point_coords [k, n, 2], point_labels [k, n]) in the model frame.

    boxes [k, 4] (or [4]); points [n, 2] for one prompt or [k, n, 2] for k prompts, labels alike (default 1).
    With both, prompt i is points i followed by box i (a single prompt of points goes with each box)."""
    if boxes is None and points is None:
        raise InputError("give a box or at least one point")
    bx = None
    if boxes is not None:
        bx = np.asarray(boxes, dtype=np.float64)
        if bx.ndim == 1:
            bx = bx[None]
        if bx.ndim != 2 or bx.shape[1] != 4 or len(bx) == 0:
            raise InputError(f"boxes must be [k, 4] as x0 y0 x1 y1, got shape {bx.shape}")
        if not np.isfinite(bx).all():
            raise InputError("box coordinates must be finite numbers")
        if not ((bx[:, 2] > bx[:, 0]) & (bx[:, 3] > bx[:, 1])).all():
            raise InputError("a box needs x1 > x0 and y1 > y0")
    pt = lb = None
    if points is not None:
        pt = np.asarray(points, dtype=np.float64)
        if pt.ndim == 2:
            pt = pt[None]
        if pt.ndim != 3 or pt.shape[2] != 2 or pt.shape[1] == 0:
            raise InputError(f"points must be [n, 2] or [k, n, 2] as x y, got shape {pt.shape}")
        if not np.isfinite(pt).all():
            raise InputError("point coordinates must be finite numbers")
        lb = np.ones(pt.shape[:2]) if labels is None else np.asarray(labels, dtype=np.float64).reshape(-1, pt.shape[1])
        if lb.shape[1] != pt.shape[1] or len(lb) not in (1, len(pt)):
            raise InputError(f"{lb.size} labels for {pt.shape[0] * pt.shape[1]} points")
        if not np.isin(lb, (0, 1)).all():
            raise InputError("point labels must be 1 (foreground) or 0 (background)")
        lb = np.broadcast_to(lb, pt.shape[:2])
    elif labels is not None:
        raise InputError("labels given without points")
    k = max(len(bx) if bx is not None else 1, len(pt) if pt is not None else 1)
    for name, arr in (("boxes", bx), ("points", pt)):
        if arr is not None and len(arr) not in (1, k):
            raise InputError(f"{len(arr)} {name} for {k} prompts")
    coords, labs = [], []
    if pt is not None:
        coords.append(np.broadcast_to(transform_coords(pt, geo), (k, *pt.shape[1:])))
        labs.append(np.broadcast_to(lb, (k, pt.shape[1])))
    if bx is not None:
        coords.append(np.broadcast_to(transform_coords(bx.reshape(-1, 2, 2), geo), (k, 2, 2)))
        labs.append(np.broadcast_to(BOX_LABELS, (k, 2)))
    else:   # no box: SAM pads with one point (0, 0) labelled -1
        coords.append(np.zeros((k, 1, 2), np.float32))
        labs.append(np.full((k, 1), -1.0))
    return (np.ascontiguousarray(np.concatenate(coords, 1), dtype=np.float32),
            np.ascontiguousarray(np.concatenate(labs, 1), dtype=np.float32))


class SamOnnxPredictor:
    """set_image once, predict per prompt. `model`: a full model or an (encoder, decoder) pair (paths), on
    `runtime` ("ort", "torch" or a Runtime) with `device` / `provider` (ONNX Runtime: cpu | cuda | tensorrt)."""

    def __init__(self, model: str | Path | Sequence[str | Path], runtime="ort", device: str | None = None,
                 provider: str | None = None, *, engine=None, threads: int | None = None):
        if engine is None:
            rt = get_runtime(runtime, device, provider=provider, threads=threads)
            engine = build_predictor(model, rt)
            self.runtime_name = getattr(rt, "name", type(rt).__name__)
        else:
            self.runtime_name = "custom"
        self.engine = engine                 # sessions: preprocessed image and model-frame prompts in
        self.image_size: int = engine.image_size
        self.description: str = engine.description
        self.geometry: Geometry | None = None
        self.timings: dict[str, float] = {}

    @classmethod
    def from_engine(cls, engine: BoxPredictor) -> "SamOnnxPredictor":
        """Wrap a BoxPredictor (deploy/engines.py: sessions that take the preprocessed image)."""
        return cls(None, engine=engine)

    def set_image(self, image: np.ndarray) -> "SamOnnxPredictor":
        """HxWx3 (or HxW) uint8 RGB: preprocess as SamPredictor and run the image encoder once."""
        return self.set_preprocessed(*preprocess_image(image, self.image_size))

    def set_preprocessed(self, tensor: np.ndarray, geometry: Geometry) -> "SamOnnxPredictor":
        """The image encoder on what `preprocess_image(image, self.image_size)` returned (eval prepares the next
        image in a thread meanwhile)."""
        self.geometry = geometry
        self.timings = {"encoder_s": self.engine.set_image(tensor, geometry)}
        return self

    def predict_low_res(self, boxes=None, points=None, labels=None) -> tuple[np.ndarray, np.ndarray]:
        """The decoder alone: (low-res logits [k, s, s], predicted IoU [k]) of the best mask of each of k prompts
        (see encode_prompts); `masks_at_original_size` turns the logits into `predict`'s masks."""
        return self._decode(self.engine.predict, boxes, points, labels)

    def predict(self, boxes=None, points=None, labels=None, multimask: bool = False) -> PromptResult:
        """Masks for k prompts (see encode_prompts), at the original image size (logit > 0)."""
        if multimask:
            outs = self._decode(self.engine.run_prompts, boxes, points, labels)
            low = np.stack([np.asarray(o["low_res_masks"], np.float32).reshape(-1, *o["low_res_masks"].shape[-2:])
                            for o in outs])
            scores = np.stack([np.asarray(o["iou_predictions"], np.float32).reshape(-1) for o in outs])
        else:
            low, scores = self.predict_low_res(boxes, points, labels)
        t0 = time.perf_counter()
        masks = masks_at_original_size(low, self.geometry)
        self.timings["post_s"] = time.perf_counter() - t0
        return PromptResult(masks, scores, low)

    def _decode(self, run, boxes, points, labels):
        """run(coords, labels) on the encoded prompts, timed as decoder_s."""
        if self.geometry is None:
            raise InputError("call set_image(image) before predict()")
        coords, labs = encode_prompts(self.geometry, boxes, points, labels)
        t0 = time.perf_counter()
        out = run(coords, labs)
        self.timings["decoder_s"] = time.perf_counter() - t0
        return out


def masks_at_original_size(low: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Low-res logits [..., s, s] -> boolean masks [..., H, W] at the original image size (logit > 0), in chunks
    of POST_CHUNK masks."""
    flat = low.reshape(-1, *low.shape[-2:])
    masks = np.concatenate([postprocess_masks(flat[i:i + POST_CHUNK], geometry)
                            for i in range(0, len(flat), POST_CHUNK)])
    return masks.reshape(*low.shape[:-2], *masks.shape[-2:])
