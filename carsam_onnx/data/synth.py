"""Synthetic COCO-format instance-segmentation data: the project's stand-in for COCO.

Each image holds several annotated objects of varied shape (convex, concave, thin limbs, holes), each
filled with a procedural texture or a crop of a real photograph, painted in random order over a
cluttered background (so later objects occlude earlier ones), at a spread of scales. The annotation
of an object is its *visible* part, as in COCO, with a tight box.

Determinism: image ``i`` of a set is drawn from ``numpy.random.default_rng([seed, i])`` alone, so a
seed gives the same images and annotations whatever the number of images or worker processes, and
sets made from different seeds (train / calibration / validation) share no image. Photograph
textures come from scikit-image's bundled data images when that package is installed (its files are
read directly, nothing is downloaded); without it every texture is procedural, so a seed's output
depends on that: ``annotations.json["info"]["photo_textures"]`` records which were used. Pillow resamples
and blurs the textures, so pixels can differ in their last bits between Pillow versions (12.3 against 13.0:
1.1e-4 of the values, by up to 8 grey levels); the annotations do not (they are drawn, not resampled).

Pure numpy + PIL; pycocotools (a project dependency) only to encode RLE when writing a set.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..errors import InputError, OutputError

GENERATOR_VERSION = 1

#: COCO categories: one per shape family.
CATEGORIES: tuple[dict, ...] = (
    {"id": 1, "name": "blob", "supercategory": "shape"},      # smooth, star-shaped, usually concave
    {"id": 2, "name": "polygon", "supercategory": "shape"},   # convex polygon
    {"id": 3, "name": "ellipse", "supercategory": "shape"},   # convex, smooth
    {"id": 4, "name": "ring", "supercategory": "shape"},      # outline with one or two holes
    {"id": 5, "name": "stick", "supercategory": "shape"},     # small body with thin limbs
    {"id": 6, "name": "crescent", "supercategory": "shape"},  # strongly concave bite
)
_CATEGORY_WEIGHTS = np.array([0.22, 0.16, 0.14, 0.16, 0.16, 0.16])

# Photographs (not line drawings, not grey scale) that scikit-image ships inside its wheel.
_PHOTO_NAMES = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                "brick.png", "grass.png", "gravel.png", "retina.jpg", "hubble_deep_field.jpg", "ihc.png",
                "camera.png", "moon.png", "coins.png", "cell.png", "page.png")

MIN_VISIBLE_PIXELS = 160         # at 256 px (scaled by area): an instance smaller than this is dropped
MIN_VISIBLE_FRACTION = 0.3       # ... or one with less than this share of its shape visible
MIN_IMAGE_SIZE = 32
MAX_IMAGE_SIZE = 4096            # one 4096 px image: 1.2 GB peak, 11 s; 100,000 px was killed for memory (SAM reads 1024)


def check_image_size(image_size: int) -> int:
    s = int(image_size)
    if not MIN_IMAGE_SIZE <= s <= MAX_IMAGE_SIZE:
        raise InputError(f"--image-size {s}: use {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} pixels for synthetic data")
    return s


PNG_BYTES_PER_PIXEL_LOW = 0.75   # a low estimate of the PNGs' size (3 bytes a pixel raw; measured 1.7 at 256 px)


def check_disk_space(out_dir: Path, num_images: int, image_size: int) -> None:
    """OutputError when `num_images` PNGs of `image_size` px cannot fit in the free space where `out_dir` goes,
    judged by a low estimate of their size, so that only a set that certainly cannot fit is refused."""
    where = Path(out_dir).absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return
    need = num_images * image_size * image_size * PNG_BYTES_PER_PIXEL_LOW
    if need > free:
        raise OutputError(f"--num-images {num_images}: {num_images} images of {image_size} px take at least "
                          f"{need / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB free in {where}")


@lru_cache(maxsize=1)
def _photos() -> tuple[tuple[str, np.ndarray], ...]:
    """(name, HxWx3 uint8) for scikit-image's bundled photographs, or () without scikit-image."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return ()
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    out = []
    for name in _PHOTO_NAMES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except OSError:
            continue
        if min(arr.shape[:2]) >= 64:
            out.append((name, arr))
    return tuple(out)


def photo_texture_names() -> list[str]:
    """Names of the photographs this installation draws textures from (empty: procedural only)."""
    return [n for n, _ in _photos()]


# ----------------------------------------------------------------------------------------- textures
def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, size=3).astype(np.float32)


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """An h x w x 3 float32 texture in [0, 255]: procedural, or a crop of a photograph."""
    photos = _photos()
    kind = rng.choice(6, p=[0.14, 0.16, 0.12, 0.2, 0.1, 0.28] if photos else [0.2, 0.22, 0.16, 0.28, 0.14, 0.0])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) if kind <= 2 else (None, None)
    if kind == 0:  # flat colour with a linear shading gradient
        theta = rng.uniform(0, 2 * np.pi)
        g = (xx * math.cos(theta) + yy * math.sin(theta)) / max(h, w)
        tex = _colour(rng)[None, None] * (1 + rng.uniform(-0.5, 0.5) * g[..., None])
    elif kind == 1:  # stripes between two colours
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(3, 24)
        s = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * math.cos(theta) + yy * math.sin(theta)) / period)
        if rng.random() < 0.5:
            s = (s > 0.5).astype(np.float32)
        a, b = _colour(rng), _colour(rng)
        tex = a[None, None] * s[..., None] + b[None, None] * (1 - s[..., None])
    elif kind == 2:  # checker board, possibly rotated
        theta = rng.uniform(0, np.pi)
        cell = rng.uniform(3, 20)
        u = xx * math.cos(theta) + yy * math.sin(theta)
        v = -xx * math.sin(theta) + yy * math.cos(theta)
        s = ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float32)
        a, b = _colour(rng), _colour(rng)
        tex = a[None, None] * s[..., None] + b[None, None] * (1 - s[..., None])
    elif kind == 3:  # smooth colour noise: a coarse random grid upsampled
        gh, gw = int(rng.integers(2, 9)), int(rng.integers(2, 9))
        base = _colour(rng)
        grid = np.clip(base[None, None] + rng.normal(0, rng.uniform(15, 70), size=(gh, gw, 3)), 0, 255)
        tex = np.asarray(Image.fromarray(grid.astype(np.uint8)).resize((w, h), Image.BICUBIC), dtype=np.float32)
    elif kind == 4:  # speckle: fine noise around a colour
        tex = _colour(rng)[None, None] + rng.normal(0, rng.uniform(8, 40), size=(h, w, 1)).astype(np.float32)
        if rng.random() < 0.5:
            tex = tex + rng.normal(0, 10, size=(h, w, 3)).astype(np.float32)
    else:  # crop of a real photograph, rescaled and colour-jittered
        _, arr = photos[int(rng.integers(len(photos)))]
        ph, pw = arr.shape[:2]
        scale = rng.uniform(0.5, 3.0)
        ch, cw = min(ph, max(8, int(h * scale))), min(pw, max(8, int(w * scale)))
        y0, x0 = int(rng.integers(0, ph - ch + 1)), int(rng.integers(0, pw - cw + 1))
        crop = Image.fromarray(arr[y0:y0 + ch, x0:x0 + cw])
        tex = np.asarray(crop.resize((w, h), Image.BILINEAR), dtype=np.float32)
        tex = tex * rng.uniform(0.7, 1.3, size=3).astype(np.float32) + rng.uniform(-30, 30)
    return np.clip(tex, 0, 255).astype(np.float32)


# ------------------------------------------------------------------------------------------- shapes
def _transform(pts: np.ndarray, rng: np.random.Generator, cx: float, cy: float) -> list[tuple[float, float]]:
    """Random rotation and anisotropic stretch of unit-scale points, then a move to (cx, cy)."""
    a = rng.uniform(0, 2 * np.pi)
    stretch = rng.uniform(0.6, 1.0)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    p = (pts * np.array([1.0, stretch])) @ rot.T + np.array([cx, cy])
    return [(float(x), float(y)) for x, y in p]


def _radial(rng: np.random.Generator, r: float, n: int = 72, rough: float = 0.3) -> np.ndarray:
    """A star-shaped outline r(theta) with a few random harmonics (concave when rough is large)."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    rad = np.ones_like(t)
    for k in range(2, 7):
        rad += rng.uniform(0, rough) / k ** 0.6 * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    rad = np.clip(rad, 0.25, None) * r
    return np.stack([rad * np.cos(t), rad * np.sin(t)], 1)


def _ellipse(r: float, n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _draw_shape(draw: ImageDraw.ImageDraw, cat: int, rng: np.random.Generator, cx: float, cy: float, r: float) -> None:
    """Draw shape family `cat` (1..6) of radius about r centred at (cx, cy): fill 1, holes 0."""
    if cat == 1:
        draw.polygon(_transform(_radial(rng, r, rough=rng.uniform(0.25, 0.7)), rng, cx, cy), fill=1)
    elif cat == 2:
        t = np.sort(rng.uniform(0, 2 * np.pi, size=int(rng.integers(3, 9))))
        draw.polygon(_transform(np.stack([r * np.cos(t), r * np.sin(t)], 1), rng, cx, cy), fill=1)
    elif cat == 3:
        draw.polygon(_transform(_ellipse(r), rng, cx, cy), fill=1)
    elif cat == 4:
        a = rng.uniform(0, 2 * np.pi)
        draw.polygon(_transform(_radial(rng, r, rough=0.2), rng, cx, cy), fill=1)
        n_holes = 1 if rng.random() < 0.7 or r < 20 else 2
        for j in range(n_holes):
            hr = r * (rng.uniform(0.35, 0.55) if n_holes == 1 else rng.uniform(0.2, 0.3))
            off = 0.0 if n_holes == 1 else r * 0.4 * (1 if j == 0 else -1)
            hx, hy = cx + off * math.cos(a), cy + off * math.sin(a)
            draw.polygon(_transform(_ellipse(hr), rng, hx, hy), fill=0)
    elif cat == 5:
        body = r * rng.uniform(0.25, 0.45)
        draw.polygon(_transform(_ellipse(body), rng, cx, cy), fill=1)
        width = max(1, int(round(rng.uniform(2.0, max(3.0, r / 6)))))
        for _ in range(int(rng.integers(2, 6))):
            a = rng.uniform(0, 2 * np.pi)
            length = r * rng.uniform(0.7, 1.2)
            mx, my = cx + length * 0.6 * math.cos(a), cy + length * 0.6 * math.sin(a)
            b = a + rng.uniform(-0.9, 0.9)
            ex, ey = mx + length * 0.4 * math.cos(b), my + length * 0.4 * math.sin(b)
            draw.line([(cx, cy), (mx, my), (ex, ey)], fill=1, width=width, joint="curve")
    else:
        draw.polygon(_transform(_ellipse(r), rng, cx, cy), fill=1)
        a = rng.uniform(0, 2 * np.pi)
        d = r * rng.uniform(0.35, 0.7)
        draw.polygon(_transform(_ellipse(r * rng.uniform(0.75, 1.0)), rng, cx + d * math.cos(a), cy + d * math.sin(a)),
                     fill=0)


def _local_mask(rng: np.random.Generator, size: int, cat: int, cx: float, cy: float, r: float,
                reach: float = 2.7) -> tuple[np.ndarray, int, int]:
    """Shape family `cat` drawn in the window of the image it can reach: (mask, top, left)."""
    x0, y0 = max(0, int(cx - reach * r) - 2), max(0, int(cy - reach * r) - 2)
    x1, y1 = min(size, int(cx + reach * r) + 3), min(size, int(cy + reach * r) + 3)
    im = Image.new("L", (max(1, x1 - x0), max(1, y1 - y0)), 0)
    _draw_shape(ImageDraw.Draw(im), cat, rng, cx - x0, cy - y0, r)
    return np.asarray(im, dtype=bool), y0, x0


def _paint(canvas: np.ndarray, mask: np.ndarray, top: int, left: int, rng: np.random.Generator, shade: bool = True) -> None:
    """Fill canvas[top:, left:] where mask with a fresh texture computed over the mask's box only."""
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    if rows.size == 0:
        return
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    tex = _texture(rng, y1 - y0, x1 - x0)
    if shade:  # soft directional light over the object
        yy, xx = np.mgrid[0:y1 - y0, 0:x1 - x0].astype(np.float32)
        a = rng.uniform(0, 2 * np.pi)
        g = (xx * math.cos(a) + yy * math.sin(a)) / max(y1 - y0, x1 - x0, 1)
        tex = np.clip(tex * (1 + rng.uniform(0, 0.4) * (g[..., None] - 0.5)), 0, 255)
    m = mask[y0:y1, x0:x1]
    canvas[top + y0:top + y1, left + x0:left + x1][m] = tex[m]


def generate_sample(rng: np.random.Generator, image_size: int = 256) -> tuple[np.ndarray, list[np.ndarray], list[int]]:
    """One synthetic image: (HxWx3 uint8 image, visible instance masks bool HxW, category ids).

    Masks are disjoint (an object's mask is what later objects leave visible); instances with too
    little visible are dropped. Draws everything from `rng`.
    """
    s = check_image_size(image_size)
    canvas = _texture(rng, s, s)
    # Clutter: small unannotated marks, lines and blobs.
    n_clutter = int(rng.integers(4, 30))
    for _ in range(n_clutter):
        x, y = rng.uniform(0, s, size=2)
        if rng.random() < 0.4:
            ang, ln = rng.uniform(0, 2 * np.pi), rng.uniform(0.03, 0.25) * s
            width = int(rng.integers(1, 3))
            x0, y0 = int(max(0, min(x, x + ln * math.cos(ang)) - 3)), int(max(0, min(y, y + ln * math.sin(ang)) - 3))
            im = Image.new("L", (s - x0, s - y0), 0)
            ImageDraw.Draw(im).line([(x - x0, y - y0), (x + ln * math.cos(ang) - x0, y + ln * math.sin(ang) - y0)],
                                    fill=1, width=width)
            m, top, left = np.asarray(im, dtype=bool), y0, x0
        else:
            m, top, left = _local_mask(rng, s, int(rng.integers(1, 4)), x, y, rng.uniform(0.008, 0.035) * s)
        _paint(canvas, m, top, left, rng, shade=False)

    n_obj = int(rng.integers(3, 9))
    owner = np.zeros((s, s), dtype=np.int16)  # 0 = background, k = object k (1-based)
    cats, full_area = [], []
    for k in range(1, n_obj + 1):
        cat = int(rng.choice(len(CATEGORIES), p=_CATEGORY_WEIGHTS)) + 1
        r = 0.5 * s * math.exp(rng.uniform(math.log(0.1), math.log(0.7)))
        cx, cy = rng.uniform(0.05, 0.95, size=2) * s
        m, top, left = _local_mask(rng, s, cat, cx, cy, r)
        cats.append(cat)
        full_area.append(int(m.sum()))
        if full_area[-1] == 0:
            continue
        _paint(canvas, m, top, left, rng)
        owner[top:top + m.shape[0], left:left + m.shape[1]][m] = k

    if rng.random() < 0.5:  # mild camera blur and sensor noise
        pass_blur = rng.uniform(0.3, 1.0)
        canvas = np.asarray(Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)).filter(
            ImageFilter.GaussianBlur(pass_blur)), dtype=np.float32)
    canvas = canvas + rng.normal(0, rng.uniform(0, 6), size=(s, s, 1)).astype(np.float32)
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)

    masks, out_cats = [], []
    min_pixels = MIN_VISIBLE_PIXELS * (s / 256) ** 2
    for k in range(1, n_obj + 1):
        m = owner == k
        vis = int(m.sum())
        if vis >= min_pixels and vis >= MIN_VISIBLE_FRACTION * full_area[k - 1]:
            masks.append(m)
            out_cats.append(cats[k - 1])
    return image, masks, out_cats


def sample_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of image `index` of the set with `seed` (independent of all other images)."""
    return np.random.default_rng([int(seed), int(index)])


def mask_box_xywh(mask: np.ndarray) -> list[float]:
    """COCO box [x, y, w, h] tight on a mask (pixel-edge coordinates)."""
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1 - cols[0]), float(rows[-1] + 1 - rows[0])]


# -------------------------------------------------------------------------------------------- write
def _check_output_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a folder; choose another path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputError(f"output folder {out} is not empty; choose another path or pass --force")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:   # missing folders above `out` are created
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot write {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write {out}: folder {parent} is not writable")


def write_synthetic_coco(out_dir: str | Path, num_images: int, seed: int, image_size: int = 256,
                         force: bool = False) -> Path:
    """Write a COCO instance-segmentation set: out_dir/annotations.json (compressed RLE masks, tight
    boxes, categories) and out_dir/images/NNNNNN.png. Written in a temporary folder beside out_dir
    and renamed into place. Returns the path of annotations.json."""
    from pycocotools import mask as mask_utils

    if int(num_images) < 1:
        raise InputError(f"--num-images must be at least 1 (got {num_images})")
    if int(seed) < 0:
        raise InputError(f"--seed must be a non-negative integer (got {seed})")
    check_image_size(image_size)                           # before the output folder is made
    out = Path(out_dir)
    check_disk_space(out, int(num_images), int(image_size))
    _check_output_dir(out, force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise OutputError(f"cannot write {out}: {e.strerror or e}") from None
    try:
        (tmp / "images").mkdir()
        images, anns = [], []
        for i in range(int(num_images)):
            img, masks, cats = generate_sample(sample_rng(seed, i), image_size)
            name = f"{i:06d}.png"
            Image.fromarray(img).save(tmp / "images" / name, format="PNG", optimize=False)
            images.append({"id": i + 1, "file_name": name, "height": img.shape[0], "width": img.shape[1]})
            for m, c in zip(masks, cats):
                rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(c),
                             "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
                             "area": float(m.sum()), "bbox": mask_box_xywh(m), "iscrowd": 0})
        info = {"description": "carsam-onnx synthetic instance segmentation set", "generator_version": GENERATOR_VERSION,
                "seed": int(seed), "num_images": int(num_images), "image_size": int(image_size),
                "photo_textures": photo_texture_names()}
        doc = {"info": info, "images": images, "annotations": anns, "categories": [dict(c) for c in CATEGORIES]}
        (tmp / "annotations.json").write_text(json.dumps(doc, separators=(",", ":")))
        os.chmod(tmp, 0o755)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "annotations.json"
