"""COCO-format instance-segmentation datasets: an annotations JSON and a folder of images.

Two layouts:
- a dataset folder: DIR/annotations.json and DIR/images/ (what data/synth.py writes);
- the standard COCO layout: --images DIR --annotations FILE.json (e.g. val2017/ and
  annotations/instances_val2017.json).

Segmentations may be polygons, uncompressed RLE or compressed RLE. Annotations without "area" or "iscrowd"
get them (area from the mask; iscrowd 0), so COCOeval's area ranges work on hand-written sets too.
"""
from __future__ import annotations

import contextlib
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from ..errors import InputError, first_line

ANNOTATIONS_NAME = "annotations.json"
IMAGES_DIRNAME = "images"


@dataclass(frozen=True)
class ImageInfo:
    id: int
    file_name: str
    height: int
    width: int


def _read_json(path: Path, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise InputError(f"cannot read {what} {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{what} {path} is not valid JSON ({first_line(e)})") from None


BOX_TOLERANCE_PX = 1.0   # a box may poke this far outside its image (rounding in tools' outputs)


def _check_bbox(src: Path, i: int, bbox, info: ImageInfo) -> None:
    """An annotation's "bbox" [x, y, w, h]: four finite numbers, no negative size, inside the image."""
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        raise InputError(f"{src}: annotations[{i}] has a bbox {bbox!r}; expected [x, y, width, height]") from None
    if not all(np.isfinite([x, y, w, h])):
        raise InputError(f"{src}: annotations[{i}] has a non-finite bbox {bbox!r}")
    if w < 0 or h < 0:
        raise InputError(f"{src}: annotations[{i}] has a bbox of negative size {bbox!r}")
    t = BOX_TOLERANCE_PX
    if x < -t or y < -t or x + w > info.width + t or y + h > info.height + t:
        raise InputError(f"{src}: annotations[{i}] bbox {bbox!r} lies outside image {info.id} "
                         f"({info.width}x{info.height})")


def _quiet(fn, *args):
    """pycocotools prints progress lines; keep them off the user's stdout."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


class CocoDataset:
    """Images and instance annotations of one COCO-format set. Image ids are the JSON's ids."""

    def __init__(self, images_dir: str | Path, annotations_path: str | Path, check_files: bool = True):
        self.images_dir = Path(images_dir)
        self.annotations_path = Path(annotations_path)
        if not self.annotations_path.is_file():
            raise InputError(f"annotations file not found: {self.annotations_path}")
        if not self.images_dir.is_dir():
            raise InputError(f"images folder not found: {self.images_dir}")
        data = _read_json(self.annotations_path, "annotations file")
        self.images, anns, self.categories = self._validate(data)
        self._by_file = {info.file_name: info.id for info in self.images.values()}
        self._fill_missing_fields(anns)
        self.coco = COCO()
        self.coco.dataset = {"images": [vars(i) for i in self.images.values()], "annotations": anns,
                             "categories": self.categories, "info": data.get("info", {}),
                             "licenses": data.get("licenses", [])}
        _quiet(self.coco.createIndex)
        if check_files:
            self.check_image_files()

    # ---- construction ----------------------------------------------------------------------------------------
    def _validate(self, data) -> tuple[dict[int, ImageInfo], list[dict], list[dict]]:
        src = self.annotations_path
        if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
                or not isinstance(data.get("annotations"), list):
            raise InputError(f"{src} is not a COCO annotations file (needs 'images' and 'annotations' lists)")
        images: dict[int, ImageInfo] = {}
        for i, im in enumerate(data["images"]):
            try:
                info = ImageInfo(int(im["id"]), str(im["file_name"]), int(im["height"]), int(im["width"]))
            except (KeyError, TypeError, ValueError):
                raise InputError(f"{src}: images[{i}] needs id, file_name, height and width") from None
            if info.height < 1 or info.width < 1:
                raise InputError(f"{src}: image {info.id} has size {info.height}x{info.width}")
            if info.id in images:
                raise InputError(f"{src}: image id {info.id} appears twice")
            images[info.id] = info
        if not images:
            raise InputError(f"{src} lists no images")
        anns = []
        ann_ids: dict = {}
        for i, a in enumerate(data["annotations"]):
            if not isinstance(a, dict) or "image_id" not in a or "category_id" not in a or "segmentation" not in a:
                raise InputError(f"{src}: annotations[{i}] needs image_id, category_id and segmentation")
            if a["image_id"] not in images:
                raise InputError(f"{src}: annotations[{i}] refers to image id {a['image_id']}, "
                                 "which is not in 'images'")
            if "bbox" in a:
                _check_bbox(src, i, a["bbox"], images[a["image_id"]])
            if "id" in a and a["id"] in ann_ids:
                raise InputError(f"{src}: annotation id {a['id']} appears twice (annotations[{ann_ids[a['id']]}] "
                                 f"and annotations[{i}])")
            if "id" in a:
                ann_ids[a["id"]] = i
            anns.append(dict(a))
        categories = data.get("categories")
        if not isinstance(categories, list) or not categories:
            categories = [{"id": c, "name": str(c)} for c in sorted({a["category_id"] for a in anns})]
        return images, anns, categories

    def _fill_missing_fields(self, anns: list[dict]) -> None:
        used = {a["id"] for a in anns if "id" in a}
        next_id = max(used, default=0) + 1
        seen = set()
        for a in anns:
            if "id" not in a or a["id"] in seen:
                while next_id in used:
                    next_id += 1
                a["id"] = next_id
                used.add(next_id)
            seen.add(a["id"])
            a.setdefault("iscrowd", 0)
            if "area" not in a or "bbox" not in a:
                rle = self._rle(a)
                a.setdefault("area", float(mask_utils.area(rle)))
                a.setdefault("bbox", [float(v) for v in mask_utils.toBbox(rle)])

    def _rle(self, ann: dict) -> dict:
        info = self.images[ann["image_id"]]
        h, w = info.height, info.width
        seg = ann["segmentation"]
        try:
            if isinstance(seg, list):  # polygons
                return mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
            if isinstance(seg, dict) and isinstance(seg.get("counts"), list):  # uncompressed RLE
                return mask_utils.frPyObjects(seg, h, w)
            if isinstance(seg, dict) and "counts" in seg:
                return seg if isinstance(seg["counts"], bytes) else {"size": seg["size"],
                                                                      "counts": seg["counts"].encode()}
        except Exception as e:
            raise InputError(f"{self.annotations_path}: annotation {ann.get('id')} has an unreadable "
                             f"segmentation ({type(e).__name__})") from None
        raise InputError(f"{self.annotations_path}: annotation {ann.get('id')} has a segmentation that is "
                         "neither polygons nor RLE")

    def check_image_files(self, image_ids=None) -> None:
        ids = list(self.images) if image_ids is None else list(image_ids)
        missing = [self.images[i].file_name for i in ids if not (self.images_dir / self.images[i].file_name).is_file()]
        if missing:
            raise InputError(f"{len(missing)} of {len(ids)} images listed in {self.annotations_path.name} are "
                             f"missing from {self.images_dir} (e.g. {missing[0]})")

    # ---- access ----------------------------------------------------------------------------------------------
    @property
    def image_ids(self) -> list[int]:
        return sorted(self.images)

    def image_id_for_file(self, file_name: str) -> int | None:
        return self._by_file.get(file_name, self._by_file.get(Path(file_name).name))

    def annotations(self, image_id: int) -> list[dict]:
        return [self.coco.anns[i] for i in self.coco.getAnnIds(imgIds=[image_id])]

    def annotation(self, ann_id: int) -> dict:
        return self.coco.anns[ann_id]

    def ann_rle(self, ann: dict) -> dict:
        """Compressed RLE of an annotation's mask at the image size."""
        return self.coco.annToRLE(ann)

    def ann_mask(self, ann: dict) -> np.ndarray:
        with warnings.catch_warnings():  # pycocotools 2.0.x under numpy 2: a DeprecationWarning per call
            warnings.simplefilter("ignore", DeprecationWarning)
            return mask_utils.decode(self.ann_rle(ann)).astype(bool)

    def read_image(self, image_id: int) -> np.ndarray:
        """HxWx3 uint8 RGB; checks that the file matches the size the annotations give."""
        info = self.images[image_id]
        image = read_image_file(self.images_dir / info.file_name)
        if image.shape[:2] != (info.height, info.width):
            raise InputError(f"image {info.file_name} is {image.shape[0]}x{image.shape[1]} but "
                             f"{self.annotations_path.name} says {info.height}x{info.width}")
        return image

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        return (f"CocoDataset({self.images_dir}, {self.annotations_path.name}: {len(self.images)} images, "
                f"{len(self.coco.anns)} annotations)")


def read_image_file(path: str | Path) -> np.ndarray:
    """Any PIL-readable image -> HxWx3 uint8 RGB (no EXIF rotation, as COCO's sizes assume)."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            if im.mode not in ("RGB", "L") and im.mode.startswith(("I", "F")):
                raise InputError(f"image {path} has pixel mode {im.mode}; use 8-bit RGB or gray images")
            return np.asarray(im.convert("RGB"))
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"image not found: {path}") from None
    except Image.DecompressionBombError as e:   # PIL's guard against images that would exhaust memory
        raise InputError(f"image {path} is too large to read safely ({str(e).split(', could be')[0]}); "
                         "downscale it first") from None
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError... for bad files
        raise InputError(f"cannot read image {path} ({type(e).__name__})") from None


def load_coco_dataset(dataset: str | Path | None = None, images: str | Path | None = None,
                      annotations: str | Path | None = None, check_files: bool = True) -> CocoDataset:
    """A dataset from `dataset` (DIR with annotations.json and images/) or from `images` + `annotations`."""
    if dataset is not None:
        if images is not None or annotations is not None:
            raise InputError("give either --dataset DIR or --images DIR --annotations FILE.json, not both")
        root = Path(dataset)
        if not root.is_dir():
            raise InputError(f"dataset folder not found: {root}")
        ann = root / ANNOTATIONS_NAME
        if not ann.is_file():
            raise InputError(f"dataset folder {root} has no {ANNOTATIONS_NAME}; for the standard COCO layout "
                             "give --images DIR --annotations FILE.json")
        img_dir = root / IMAGES_DIRNAME
        if not img_dir.is_dir():
            raise InputError(f"dataset folder {root} has no {IMAGES_DIRNAME}/ folder")
        return CocoDataset(img_dir, ann, check_files)
    if images is None or annotations is None:
        raise InputError("give --dataset DIR, or both --images DIR and --annotations FILE.json")
    return CocoDataset(images, annotations, check_files)
