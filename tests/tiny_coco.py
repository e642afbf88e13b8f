"""Tiny COCO-format datasets drawn with numpy, for data/ and eval/ tests (no network, no real images)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils


def _rect(h, w, x0, y0, x1, y1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def _ellipse(h, w, cx, cy, rx, ry):
    yy, xx = np.mgrid[:h, :w]
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0


def make_images(seed: int = 0, num_images: int = 3):
    """[(image HxWx3 uint8, [(mask, category_id, kind)])]; sizes vary (landscape, portrait, square)."""
    rng = np.random.default_rng(seed)
    sizes = [(96, 160), (150, 100), (120, 120), (80, 200)]
    out = []
    for i in range(num_images):
        h, w = sizes[i % len(sizes)]
        image = (rng.uniform(0, 60, (h, w, 3))).astype(np.uint8)
        objs = []
        x0, y0 = int(rng.integers(2, w // 3)), int(rng.integers(2, h // 3))
        objs.append((_rect(h, w, x0, y0, x0 + w // 3, y0 + h // 4), 1, "rle"))
        objs.append((_ellipse(h, w, w * 0.65, h * 0.6, w * 0.15, h * 0.2), 2, "polygon"))
        for m, cat, _ in objs:
            image[m] = np.array([200, 80, 40]) if cat == 1 else np.array([40, 180, 220])
        out.append((image, objs))
    return out


def _polygon(mask: np.ndarray) -> list[list[float]]:
    """Outline of a convex blob as one polygon (its boundary pixels ordered by angle)."""
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    edge = mask & ~(np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1))
    ey, ex = np.nonzero(edge)
    order = np.argsort(np.arctan2(ey - cy, ex - cx))
    pts = np.stack([ex[order] + 0.5, ey[order] + 0.5], 1)
    return [pts.reshape(-1).round(2).tolist()]


def write_coco(root: Path, seed: int = 0, num_images: int = 3, layout: str = "dir", crowd: bool = False,
               image_format: str = "png") -> tuple[Path, Path, list]:
    """Write a dataset; layout "dir" -> root/annotations.json + root/images/, "coco" -> root/val/ +
    root/instances_val.json. Returns (images_dir, annotations_path, drawn images)."""
    root = Path(root)
    images_dir = root / ("images" if layout == "dir" else "val")
    images_dir.mkdir(parents=True, exist_ok=True)
    ann_path = root / ("annotations.json" if layout == "dir" else "instances_val.json")
    drawn = make_images(seed, num_images)
    images, anns = [], []
    for i, (image, objs) in enumerate(drawn):
        image_id = 100 + i
        name = f"{image_id:012d}.{image_format}"
        Image.fromarray(image).save(images_dir / name)
        images.append({"id": image_id, "file_name": name, "height": image.shape[0], "width": image.shape[1]})
        for m, cat, kind in objs:
            if kind == "rle":
                rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
                seg = {"size": rle["size"], "counts": rle["counts"].decode()}
            else:
                seg = _polygon(m)
            ys, xs = np.nonzero(m)
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "segmentation": seg,
                         "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                                  float(ys.max() - ys.min() + 1)], "area": float(m.sum()), "iscrowd": 0})
        if crowd:
            m = _rect(image.shape[0], image.shape[1], 0, 0, 8, 8)
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 1,
                         "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                         "bbox": [0.0, 0.0, 8.0, 8.0], "area": 64.0})
    data = {"images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "box"}, {"id": 2, "name": "blob"}]}
    ann_path.write_text(json.dumps(data))
    return images_dir, ann_path, drawn
