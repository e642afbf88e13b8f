"""Box prompts: ground-truth boxes, detector boxes from a COCO detection-results JSON, and their encoding as
SAM model inputs (a box = two points labelled 2 (top-left) and 3 (bottom-right) in the S x S input frame).

Also the calibration set for `quantize`: images with one box prompt each, preprocessed as SamPredictor does.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CalibrationError, InputError, first_line
from .coco import ANNOTATIONS_NAME, BOX_TOLERANCE_PX, IMAGES_DIRNAME, CocoDataset, read_image_file
from .memory import check_images_fit
from .preprocess import Geometry, preprocess_image, transform_coords

BOX_LABELS = np.array([2.0, 3.0], dtype=np.float32)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class BoxPrompt:
    """One box prompt on one image, in original pixel coordinates (x0, y0, x1, y1)."""

    image_id: int
    box_xyxy: tuple[float, float, float, float]
    category_id: int
    score: float | None = None        # detector score; None for ground-truth boxes
    ann_id: int | None = None         # the ground-truth annotation this prompt came from


def xywh_to_xyxy(b) -> tuple[float, float, float, float]:
    x, y, w, h = (float(v) for v in b)
    return x, y, x + w, y + h


def box_inputs(boxes_xyxy: np.ndarray, geo: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """k boxes in original pixels -> (point_coords [k, 2, 2], point_labels [k, 2]) in the model input frame.
    Row i is a whole prompt: feed point_coords[i:i+1], point_labels[i:i+1] to a SAM graph."""
    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 2, 2)
    coords = transform_coords(boxes, geo)
    labels = np.broadcast_to(BOX_LABELS, (len(boxes), 2)).copy()
    return coords, labels


# ---- evaluation prompts ---------------------------------------------------------------------------------------
def gt_box_prompts(dataset: CocoDataset) -> dict[int, list[BoxPrompt]]:
    """One prompt per non-crowd ground-truth instance with a non-empty box (as CAR-SAM evaluates)."""
    out: dict[int, list[BoxPrompt]] = {}
    for image_id in dataset.image_ids:
        for a in dataset.annotations(image_id):
            if a.get("iscrowd", 0):
                continue
            x0, y0, x1, y1 = xywh_to_xyxy(a["bbox"])
            if not (x1 > x0 and y1 > y0):
                continue
            out.setdefault(image_id, []).append(BoxPrompt(image_id, (x0, y0, x1, y1), int(a["category_id"]),
                                                          None, int(a["id"])))
    return out


def _read_json(path: Path, error):
    """The parsed prompts file; `error` (an error class) with one line when it is missing or not JSON."""
    if not path.is_file():
        raise error(f"prompts file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"prompts file {path} is not readable JSON ({first_line(e)})") from None


def _read_results(path: Path, error) -> list:
    data = _read_json(path, error)
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        data = data["annotations"]
    if not isinstance(data, list):
        raise error(f"prompts file {path} is not a COCO detection-results list "
                    '([{"image_id": ..., "bbox": [x, y, w, h], "category_id": ..., "score": ...}, ...])')
    return data


def _entry_box(path: Path, i: int, r, error) -> tuple[float, float, float, float]:
    if not isinstance(r, dict) or not isinstance(r.get("bbox"), (list, tuple)) or len(r["bbox"]) != 4:
        raise error(f"{path}: entry {i} needs a 'bbox' [x, y, w, h]")
    try:
        box = xywh_to_xyxy(r["bbox"])
    except (TypeError, ValueError):
        raise error(f"{path}: entry {i} has a non-numeric bbox {r['bbox']!r}") from None
    if not all(math.isfinite(v) for v in box):
        raise error(f"{path}: entry {i} has a non-finite bbox {r['bbox']!r}")
    if not (box[2] > box[0] and box[3] > box[1]):
        raise error(f"{path}: entry {i} has an empty bbox {r['bbox']!r} (width and height must be > 0)")
    return box


def _box_inside(box, height: int, width: int, tol: float = BOX_TOLERANCE_PX) -> bool:
    return box[0] >= -tol and box[1] >= -tol and box[2] <= width + tol and box[3] <= height + tol


def _clip(box, height: int, width: int) -> tuple[float, float, float, float]:
    return (min(max(box[0], 0.0), width), min(max(box[1], 0.0), height),
            min(max(box[2], 0.0), width), min(max(box[3], 0.0), height))


def load_detection_prompts(path: str | Path, dataset: CocoDataset, min_score: float = 0.0) -> dict[int, list[BoxPrompt]]:
    """Detector boxes from a COCO detection-results JSON (as PTQ4SAM evaluates).

    Entries name their image by "image_id" or "file_name". Every image must be in `dataset` (a results file
    for another split is an error). Boxes are clipped to the image; a box further than the image by more than
    a pixel, an empty box or a non-finite one is an error. Entries with score < min_score are dropped.
    """
    path = Path(path)
    data = _read_results(path, InputError)
    out: dict[int, list[BoxPrompt]] = {}
    unknown: list = []
    for i, r in enumerate(data):
        box = _entry_box(path, i, r, InputError)
        image_id = _resolve_image(r, dataset)
        if image_id is None:
            unknown.append(r.get("image_id", r.get("file_name")))
            continue
        if "category_id" not in r:
            raise InputError(f"{path}: entry {i} has no category_id (COCO segm AP needs it)")
        score = float(r.get("score", 1.0))
        if not math.isfinite(score):
            raise InputError(f"{path}: entry {i} has a non-finite score")
        if score < min_score:
            continue
        info = dataset.images[image_id]
        if not _box_inside(box, info.height, info.width):
            raise InputError(f"{path}: entry {i} box {r['bbox']} lies outside image {image_id} "
                             f"({info.width}x{info.height})")
        out.setdefault(image_id, []).append(
            BoxPrompt(image_id, _clip(box, info.height, info.width), int(r["category_id"]), score, None))
    if unknown:
        raise InputError(f"prompts file {path} has boxes for {len(set(map(str, unknown)))} images that are not in "
                         f"{dataset.annotations_path.name} (e.g. {unknown[0]!r}); is it for another split?")
    if not out:
        raise InputError(f"prompts file {path} has no boxes" + (f" with score >= {min_score}" if min_score else ""))
    return out


def _resolve_image(r: dict, dataset: CocoDataset) -> int | None:
    if "image_id" in r:
        try:
            image_id = int(r["image_id"])
        except (TypeError, ValueError):
            return None
        return image_id if image_id in dataset.images else None
    if "file_name" in r:
        return dataset.image_id_for_file(str(r["file_name"]))
    return None


# ---- calibration set ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CalibSample:
    """One calibration input of a full SAM graph: an image and one box prompt."""

    image: np.ndarray          # [1, 3, S, S] float32, normalised and padded as SamPredictor does
    point_coords: np.ndarray   # [1, 2, 2] float32: the box corners in the S x S frame
    point_labels: np.ndarray   # [1, 2] float32: 2, 3
    source: str                # image file name
    box_xyxy: tuple[float, float, float, float]  # in original pixels


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES + (".npy",))


def _read_calib_image(path: Path) -> np.ndarray:
    """uint8 RGB; .npy files may hold HxW(x3) uint8 or float arrays in 0..255 (checked for NaN/inf)."""
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as e:
            raise CalibrationError(f"cannot read calibration image {path} ({type(e).__name__})") from None
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype.kind not in "uif":
            raise CalibrationError(f"calibration array {path} has shape {arr.shape} {arr.dtype}; "
                                   "expected HxWx3 numbers in 0..255")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise CalibrationError(f"calibration image {path} contains NaN or infinite values")
        if arr.min() < 0 or arr.max() > 255:
            raise CalibrationError(f"calibration image {path} has values outside 0..255")
        return np.rint(arr).astype(np.uint8) if arr.dtype.kind == "f" else arr.astype(np.uint8)
    try:
        return read_image_file(path)
    except InputError as e:
        raise CalibrationError(str(e)) from None


def _image_key_map(files: list[Path], ds: CocoDataset | None) -> tuple[dict[str, Path], dict[int, Path]]:
    by_name = {p.name: p for p in files}
    if ds is not None:  # a dataset folder: its annotations say which id is which file
        by_id = {i: ds.images_dir / info.file_name for i, info in ds.images.items() if info.file_name in by_name}
        return by_name, by_id
    by_id = {}
    for p in files:
        if p.stem.isdigit():  # COCO names images by zero-padded id: 000000000139.jpg
            by_id[int(p.stem)] = p
    return by_name, by_id


def _dataset_at(folder: Path) -> CocoDataset | None:
    """The COCO-layout dataset that `folder` is (DIR with annotations.json + images/) or is the images/ folder
    of; None for a plain folder of images."""
    if (folder / ANNOTATIONS_NAME).is_file() and (folder / IMAGES_DIRNAME).is_dir():
        root = folder
    elif folder.name == IMAGES_DIRNAME and (folder.parent / ANNOTATIONS_NAME).is_file():
        root = folder.parent
    else:
        return None
    try:
        return CocoDataset(root / IMAGES_DIRNAME, root / ANNOTATIONS_NAME)
    except InputError as e:
        raise CalibrationError(str(e)) from None


def _calib_boxes_from_file(prompts_file: Path, files: list[Path], ds: CocoDataset | None) -> dict[Path, list[tuple]]:
    data = _read_results(prompts_file, CalibrationError)
    by_name, by_id = _image_key_map(files, ds)
    out: dict[Path, list[tuple]] = {}
    for i, r in enumerate(data):
        box = _entry_box(prompts_file, i, r, CalibrationError)
        if "file_name" in r:
            p = by_name.get(Path(str(r["file_name"])).name)
        elif "image_id" in r:
            try:
                p = by_id.get(int(r["image_id"]))
            except (TypeError, ValueError):
                p = None
        else:
            raise CalibrationError(f"{prompts_file}: entry {i} names no image (give image_id or file_name)")
        if p is None:
            raise CalibrationError(f"{prompts_file}: entry {i} is for image "
                                   f"{r.get('file_name', r.get('image_id'))!r}, which is not in the calibration "
                                   "folder (image ids are those of its annotations.json, or else match file "
                                   "names like 000000000139.jpg)")
        out.setdefault(p, []).append(box)
    if not out:
        raise CalibrationError(f"prompts file {prompts_file} has no boxes")
    return out


def list_image_files(folder: str | Path) -> list[Path]:
    """The image files directly in `folder` (IMAGE_SUFFIXES, case-insensitive), sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_folder_prompts(prompts_file: str | Path, files: list[Path]) -> dict[Path, list[tuple]]:
    """Box prompts for a folder of images (`predict` over a folder) -> {image file: [box x0 y0 x1 y1, ...]}.

    The file is COCO JSON: an instances file as `data synth` writes (its "images" give each image_id a file_name;
    one box per annotation), or a detection-results list whose entries name their image by "file_name" or by
    "image_id" (then numeric file names, 000000000139.jpg -> 139). An entry for an image not among `files` is an
    error (InputError), as are an empty or non-finite bbox and a file with no boxes. Boxes are not clipped here.
    """
    path = Path(prompts_file)
    data = _read_json(path, InputError)
    by_name = {p.name: p for p in files}
    by_id = {int(p.stem): p for p in files if p.stem.isdigit()}
    if isinstance(data, dict) and isinstance(data.get("images"), list) and isinstance(data.get("annotations"), list):
        by_id = {}
        for i, im in enumerate(data["images"]):
            if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
                raise InputError(f"{path}: images[{i}] needs id and file_name")
            target = by_name.get(Path(str(im["file_name"])).name)
            by_id[str(im["id"])] = target if target is not None else str(im["file_name"])
        entries = data["annotations"]
        id_key = str
    elif isinstance(data, list):
        entries, id_key = data, int
    else:
        raise InputError(f"prompts file {path} is neither a COCO instances file ('images' and 'annotations') nor "
                         'a COCO detection-results list ([{"file_name" or "image_id": ..., "bbox": [x, y, w, h]}, ...])')
    out: dict[Path, list[tuple]] = {}
    folder = files[0].parent if files else Path(".")
    for i, r in enumerate(entries):
        box = _entry_box(path, i, r, InputError)
        if "file_name" in r:
            name = Path(str(r["file_name"])).name
            target = by_name.get(name)
        elif "image_id" in r:
            try:
                target = by_id.get(id_key(r["image_id"]))
            except (TypeError, ValueError):
                target = None
            name = target if isinstance(target, str) else f"image_id {r['image_id']!r}"
        else:
            raise InputError(f"{path}: entry {i} names no image (give image_id or file_name)")
        if not isinstance(target, Path):
            raise InputError(f"{path}: entry {i} is for {name}, which is not an image in {folder}")
        out.setdefault(target, []).append(box)
    if not out:
        raise InputError(f"prompts file {path} has no boxes")
    return out


def check_box_inside(box, height: int, width: int, where: str) -> tuple[float, float, float, float]:
    """A box within BOX_TOLERANCE_PX of the image, clipped to it; InputError naming `where` otherwise."""
    if not _box_inside(box, height, width):
        raise InputError(f"box {[round(v, 1) for v in box]} (x0, y0, x1, y1) lies outside {where} "
                         f"({width} x {height})")
    return _clip(box, height, width)


def check_prompts_inside(boxes, points, height: int, width: int, where: str):
    """Command-line prompts against one image: every coordinate finite, each box within BOX_TOLERANCE_PX of the
    image (then clipped to it), each point within that tolerance. Returns the boxes as checked (or None);
    InputError naming `where` otherwise (a box for a bigger image, or coordinates given normalised, say)."""
    bx = None if boxes is None else np.asarray(boxes, dtype=np.float64)
    pt = None if points is None else np.asarray(points, dtype=np.float64)
    if (bx is not None and bx.size % 4) or (pt is not None and pt.size % 2):
        return boxes                      # not boxes or points at all: encode_prompts says what shape it needs
    for name, arr in (("box", bx), ("point", pt)):
        if arr is not None and not np.isfinite(arr).all():
            bad = next(v for v in arr.reshape(-1, 4 if name == "box" else 2) if not np.isfinite(v).all())
            raise InputError(f"{name} {bad.tolist()}: coordinates must be finite numbers")
    for x, y in ([] if pt is None else pt.reshape(-1, 2)):
        if not _box_inside((x, y, x, y), height, width):
            raise InputError(f"point ({round(float(x), 1)}, {round(float(y), 1)}) lies outside {where} "
                             f"({width} x {height})")
    return None if bx is None else [check_box_inside(tuple(b.tolist()), height, width, where) for b in bx.reshape(-1, 4)]


def random_box(height: int, width: int, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """A box with sides uniform in [20%, 90%] of the image's sides, placed uniformly inside the image."""
    bw, bh = rng.uniform(0.2, 0.9) * width, rng.uniform(0.2, 0.9) * height
    x0, y0 = rng.uniform(0, width - bw), rng.uniform(0, height - bh)
    return float(x0), float(y0), float(x0 + bw), float(y0 + bh)


def load_calibration_set(images_dir: str | Path, prompts_file: str | Path | None, num: int, seed: int,
                         image_size: int, *, asked: int | None = None) -> list[CalibSample]:
    """`num` calibration samples (one image, one box each), drawn with `seed`. `asked`: the --num-calib the user
    gave when `num` also counts held-out samples; the folder is short only when it has fewer images than that.

    `images_dir` is a folder of images, or a COCO-layout dataset folder (annotations.json + images/, or its
    images/ folder). Boxes: from `prompts_file` (COCO detection results naming images by "file_name" or by
    "image_id": the dataset's ids, or for a plain folder numeric file names as in COCO, 000000000139.jpg ->
    139); else, for a dataset folder, its ground-truth boxes; else one random box per image (`random_box`: sides
    20-90% of the image's, uniform position) -- a prompt-agnostic stand-in that exercises the decoder over
    object-sized boxes without claiming to know where objects are.
    Images with boxes are sampled without replacement; one of an image's boxes is drawn at random.
    Errors (CalibrationError): empty folder, unreadable image, boxes outside the image or for images not in
    the folder, non-finite values.
    """
    if num < 1:
        raise CalibrationError(f"--num-calib {num}: must be >= 1")
    folder = Path(images_dir)
    if not folder.is_dir():
        raise CalibrationError(f"calibration folder not found: {folder}")
    ds = _dataset_at(folder)
    gt: dict[Path, list[tuple]] | None = None
    if ds is not None:
        folder = ds.images_dir
        if prompts_file is None:
            gt = {}
            for image_id, prompts in gt_box_prompts(ds).items():
                gt[ds.images_dir / ds.images[image_id].file_name] = [p.box_xyxy for p in prompts]
    files = _list_images(folder)
    if not files:
        raise CalibrationError(f"calibration folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)}, .npy)")
    boxes = _calib_boxes_from_file(Path(prompts_file), files, ds) if prompts_file is not None else gt
    candidates = sorted(boxes) if boxes is not None else files
    if not candidates:
        raise CalibrationError(f"calibration set {images_dir} has no images with boxes")
    rng = np.random.default_rng(seed)
    chosen = [candidates[i] for i in sorted(rng.permutation(len(candidates))[: num])]
    check_images_fit(len(chosen), image_size, asked=asked or num)
    samples = []
    for path in chosen:
        image = _read_calib_image(path)
        h, w = image.shape[:2]
        if boxes is None:
            box = random_box(h, w, rng)
        else:
            options = boxes[path]
            box = options[int(rng.integers(len(options)))]
            for b in options:
                if not _box_inside(b, h, w):
                    raise CalibrationError(f"box {[round(v, 1) for v in b]} (x0, y0, x1, y1) lies outside "
                                           f"{path.name} ({w}x{h})")
            box = _clip(box, h, w)
        tensor, geo = preprocess_image(image, image_size)
        coords, labels = box_inputs(np.array(box), geo)
        if not (np.isfinite(tensor).all() and np.isfinite(coords).all()):
            raise CalibrationError(f"calibration sample from {path.name} contains NaN or infinite values")
        samples.append(CalibSample(tensor, coords, labels, path.name, box))
    if len(candidates) < (asked or num):
        warnings.warn(f"calibration set {images_dir} has {len(candidates)} images with boxes; using all of them "
                      f"instead of --num-calib {asked or num}", stacklevel=2)
    return samples
