"""SamPredictor-style pre- and postprocessing, as numpy in and out.

- image: resize the longest side to S (PIL bilinear, as segment-anything's ResizeLongestSide.apply_image),
  normalise with SAM's pixel mean/std, pad bottom-right with zeros to S x S -> [1, 3, S, S] float32.
- coordinates: scale x by new_w / old_w and y by new_h / old_h (ResizeLongestSide.apply_coords).
- masks: low-res logits [k, S/4, S/4] -> bilinear to S x S -> crop the resized-image region -> bilinear to the
  original (H, W) (Sam.postprocess_masks), then threshold at 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

PIXEL_MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
PIXEL_STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)
MASK_THRESHOLD = 0.0


def resized_shape(height: int, width: int, image_size: int) -> tuple[int, int]:
    """(h, w) after resizing the longest side to `image_size` (ResizeLongestSide.get_preprocess_shape)."""
    scale = image_size * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


@dataclass(frozen=True)
class Geometry:
    """Where an original image sits inside the S x S model input."""

    original_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    image_size: int

    @classmethod
    def of(cls, height: int, width: int, image_size: int) -> "Geometry":
        return cls((int(height), int(width)), resized_shape(height, width, image_size), int(image_size))


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """HxW, HxWx1, HxWx3 or HxWx4 uint8 -> HxWx3 uint8 (gray replicated, alpha dropped)."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an HxW or HxWxC image with C in 1/3/4, got shape {image.shape}")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3])


def resize_image(image: np.ndarray, image_size: int) -> np.ndarray:
    """HxWx3 uint8 -> resized HxWx3 uint8, longest side = image_size (PIL bilinear, as SamPredictor)."""
    h, w = resized_shape(image.shape[0], image.shape[1], image_size)
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def preprocess_image(image: np.ndarray, image_size: int) -> tuple[np.ndarray, Geometry]:
    """HxWx3 uint8 RGB -> ([1, 3, S, S] float32 normalised and zero-padded bottom-right, Geometry)."""
    image = to_rgb_uint8(image)
    geo = Geometry.of(image.shape[0], image.shape[1], image_size)
    resized = resize_image(image, image_size)
    out = np.zeros((1, 3, image_size, image_size), dtype=np.float32)
    h, w = geo.resized_hw
    for c in range(3):   # (x - mean) / std in float32 per channel plane: contiguous writes, no HxWx3 temporaries
        plane = out[0, c, :h, :w]
        np.subtract(resized[:, :, c], PIXEL_MEAN[c], out=plane, dtype=np.float32)
        np.divide(plane, PIXEL_STD[c], out=plane)
    return out, geo


def transform_coords(coords: np.ndarray, geo: Geometry) -> np.ndarray:
    """Points (..., 2) as (x, y) in original pixels -> model input frame (float32)."""
    (old_h, old_w), (new_h, new_w) = geo.original_hw, geo.resized_hw
    out = np.array(coords, dtype=np.float64, copy=True)
    out[..., 0] *= new_w / old_w
    out[..., 1] *= new_h / old_h
    return out.astype(np.float32)


def transform_boxes(boxes_xyxy: np.ndarray, geo: Geometry) -> np.ndarray:
    """Boxes (k, 4) as x0, y0, x1, y1 in original pixels -> model input frame."""
    return transform_coords(np.asarray(boxes_xyxy).reshape(-1, 2, 2), geo).reshape(-1, 4)


def upscale_logits(low_res: np.ndarray | torch.Tensor, geo: Geometry) -> torch.Tensor:
    """Low-res mask logits [k, s, s] (or [k, 1, s, s]) -> logits [k, H, W] at the original size
    (Sam.postprocess_masks: bilinear to S x S, crop the resized region, bilinear to H x W)."""
    t = torch.as_tensor(np.asarray(low_res, dtype=np.float32) if not isinstance(low_res, torch.Tensor) else low_res)
    t = t.float()
    if t.ndim == 3:
        t = t[:, None]
    if t.ndim != 4 or t.shape[1] != 1:
        raise ValueError(f"expected low-res masks [k, s, s] or [k, 1, s, s], got {tuple(t.shape)}")
    s = geo.image_size
    t = F.interpolate(t, (s, s), mode="bilinear", align_corners=False)
    t = t[..., : geo.resized_hw[0], : geo.resized_hw[1]]
    t = F.interpolate(t, geo.original_hw, mode="bilinear", align_corners=False)
    return t[:, 0]


def postprocess_masks(low_res: np.ndarray | torch.Tensor, geo: Geometry) -> np.ndarray:
    """Low-res logits [k, s, s] -> boolean masks [k, H, W] at the original image size (logit > 0)."""
    with torch.no_grad():
        return (upscale_logits(low_res, geo) > MASK_THRESHOLD).numpy()
