"""`carsam-onnx predict`: one image, box and point prompts -> a mask PNG (+ an overlay PNG), through
SamOnnxPredictor (the pre/postprocessing `eval` scores with).

Prompts: every box is one prompt; points (with their labels) form one prompt, added to each box when both are
given. The mask PNG is 8-bit: with one prompt 255 inside the mask and 0 outside; with k prompts the value i
(1..k) marks prompt i's mask (a later prompt overwrites an earlier one where they overlap).
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..data.coco import read_image_file
from ..errors import OutputError
from ..modelio import check_writable
from .predictor import PromptResult, SamOnnxPredictor

PALETTE = np.array([(30, 144, 255), (255, 64, 64), (64, 200, 64), (255, 200, 0), (200, 64, 255), (0, 200, 200)],
                   np.uint8)


@dataclass
class PredictOutput:
    mask_path: Path
    overlay_path: Path | None
    scores: list[float]
    areas: list[int]
    model: str


def save_png(array_or_image, path: str | Path) -> Path:
    """Atomic PNG write (temporary file in the target folder, then rename)."""
    path = Path(path)
    image = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    parent = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=parent)
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG")
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def mask_image(masks: np.ndarray) -> np.ndarray:
    """[k, H, W] bool -> uint8 HxW: 255/0 for one mask, prompt index 1..k for several."""
    if len(masks) == 1:
        return np.where(masks[0], 255, 0).astype(np.uint8)
    out = np.zeros(masks.shape[1:], np.uint8)
    for i, m in enumerate(masks):
        out[m] = i + 1
    return out


def overlay_image(image: np.ndarray, masks: np.ndarray, boxes=None, points=None, labels=None,
                  alpha: float = 0.5) -> Image.Image:
    """The image with each mask tinted (its own colour), its outline, the boxes and the points drawn on it."""
    out = image.astype(np.float32).copy()
    for i, m in enumerate(masks):
        colour = PALETTE[i % len(PALETTE)].astype(np.float32)
        out[m] = (1 - alpha) * out[m] + alpha * colour
        edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
        out[edge] = colour
    pil = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for i, b in enumerate(np.asarray(boxes).reshape(-1, 4) if boxes is not None else []):
        draw.rectangle([float(v) for v in b], outline=tuple(int(c) for c in PALETTE[i % len(PALETTE)]), width=2)
    if points is not None:
        pts = np.asarray(points, float).reshape(-1, 2)
        labs = np.ones(len(pts)) if labels is None else np.asarray(labels).reshape(-1)
        r = max(3, round(max(image.shape[:2]) / 100))
        for (x, y), lab in zip(pts, labs):
            draw.ellipse([x - r, y - r, x + r, y + r], fill=(0, 220, 0) if lab == 1 else (230, 0, 0),
                         outline=(255, 255, 255))
    return pil


def predict_to_files(model, image, *, boxes=None, points=None, labels=None, output, overlay=None,
                     multimask: bool = False, runtime="ort", device=None, provider=None,
                     force: bool = False) -> PredictOutput:
    output = Path(output)
    if provider is not None:   # an unavailable provider fails before anything is loaded
        from ..runtime.providers import ort_providers

        ort_providers(provider)
    for p in (output, overlay):
        if p is not None:
            check_writable(p, force)
    pixels = read_image_file(image)
    predictor = SamOnnxPredictor(model, runtime, device, provider)
    predictor.set_image(pixels)
    result: PromptResult = predictor.predict(boxes=boxes, points=points, labels=labels, multimask=multimask)
    masks, scores = result.masks, result.scores
    if multimask:   # one mask per prompt in the files: the best by predicted IoU
        best = scores.argmax(1)
        masks, scores = masks[np.arange(len(masks)), best], scores[np.arange(len(scores)), best]
    save_png(mask_image(masks), output)
    if overlay is not None:
        save_png(overlay_image(pixels, masks, boxes, points, labels), overlay)
    return PredictOutput(output, Path(overlay) if overlay else None, [float(s) for s in scores],
                         [int(m.sum()) for m in masks], predictor.description)
