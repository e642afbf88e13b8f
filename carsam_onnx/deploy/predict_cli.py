"""`carsam-onnx predict`: one image, box and point prompts -> a mask PNG (+ an overlay PNG), through
SamOnnxPredictor (the pre/postprocessing `eval` scores with); or a folder of images -> a folder of mask PNGs.

Prompts: every box is one prompt; points (with their labels) form one prompt, added to each box when both are
given. The mask PNG is 8-bit: with one prompt 255 inside the mask and 0 outside; with k prompts the value i
(1..k) marks prompt i's mask (a later prompt overwrites an earlier one where they overlap).

Folder mode (IMAGE is a folder): the image files directly in it (data.prompts.IMAGE_SUFFIXES) each get
OUTPUT/<stem>.png (and OVERLAY/<stem>.png), the model loaded once and the encoder run once per image. The
prompts are the command line's, the same on every image, or a COCO JSON (`--prompts`, data.prompts.
load_folder_prompts: one box per annotation; images it has no box for are skipped). Everything is checked before
the first image runs (folder, image headers, prompts, every output path); a run that fails or is interrupted
later removes the masks and overlays it wrote and the output folders it created.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..data.coco import read_image_file
from ..data.prompts import (IMAGE_SUFFIXES, check_box_inside, check_prompts_inside, list_image_files,
                            load_folder_prompts)
from ..errors import InputError, OutputError
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


MAX_PROMPTS = 255   # prompt indices in an 8-bit mask PNG


def mask_image(masks: np.ndarray) -> np.ndarray:
    """[k, H, W] bool -> uint8 HxW: 255/0 for one mask, prompt index 1..k for several."""
    if len(masks) > MAX_PROMPTS:
        raise InputError(f"{len(masks)} prompts on one image; an 8-bit mask PNG holds at most {MAX_PROMPTS}")
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


def _predict_masks(predictor: SamOnnxPredictor, pixels, boxes, points, labels, multimask: bool):
    """(masks [k, H, W] bool, scores [k]) of one image: with multimask, each prompt's best by predicted IoU."""
    predictor.set_image(pixels)
    result: PromptResult = predictor.predict(boxes=boxes, points=points, labels=labels, multimask=multimask)
    masks, scores = result.masks, result.scores
    if multimask:   # one mask per prompt in the files: the best by predicted IoU
        best = scores.argmax(1)
        masks, scores = masks[np.arange(len(masks)), best], scores[np.arange(len(scores)), best]
    return masks, scores


def predict_to_files(model, image, *, boxes=None, points=None, labels=None, output, overlay=None,
                     multimask: bool = False, runtime="ort", device=None, provider=None,
                     force: bool = False, prompts_file=None, progress: bool = False, threads: int | None = None):
    """One image -> PredictOutput; a folder of images -> FolderOutput (predict_folder)."""
    if Path(image).is_dir():
        return predict_folder(model, image, boxes=boxes, points=points, labels=labels, output=output,
                              overlay=overlay, multimask=multimask, runtime=runtime, device=device,
                              provider=provider, force=force, prompts_file=prompts_file, progress=progress,
                              threads=threads)
    if prompts_file is not None:
        raise InputError(f"--prompts needs IMAGE to be a folder of images; {image} is a file (give its boxes "
                         "with --box)")
    output = Path(output)
    if provider is not None:   # an unavailable provider fails before anything is loaded
        from ..runtime.providers import ort_providers

        ort_providers(provider)
    if overlay is not None and Path(overlay).resolve() == output.resolve():
        raise OutputError(f"-o and --overlay name the same file {output}; the overlay would replace the masks")
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    for p in (output, overlay):
        if p is not None:
            check_writable(p, force, inputs=[image, *(m for m in models if isinstance(m, (str, Path)))])
    pixels = read_image_file(image)
    boxes = check_prompts_inside(boxes, points, *pixels.shape[:2], f"image {Path(image).name}")
    predictor = SamOnnxPredictor(model, runtime, device, provider, threads=threads)
    masks, scores = _predict_masks(predictor, pixels, boxes, points, labels, multimask)
    save_png(mask_image(masks), output)
    if overlay is not None:
        save_png(overlay_image(pixels, masks, boxes, points, labels), overlay)
    return PredictOutput(output, Path(overlay) if overlay else None, [float(s) for s in scores],
                         [int(m.sum()) for m in masks], predictor.description)


@dataclass
class FolderOutput:
    mask_dir: Path
    overlay_dir: Path | None
    images: dict[str, PredictOutput]     # image file name -> its mask file, overlay, scores and areas
    skipped: list[str]                   # images of the folder that --prompts has no box for
    model: str

    @property
    def num_prompts(self) -> int:
        return sum(len(o.scores) for o in self.images.values())


def _output_folder(folder, option: str) -> Path:
    """Check (not create) an output folder of folder mode."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{option} {folder} is a file; with a folder of images, {option} names an output folder")
    if not folder.exists():
        if folder.suffix.lower() in IMAGE_SUFFIXES:
            raise OutputError(f"{option} {folder}: with a folder of images, {option} names an output folder "
                              "(one PNG per image), not an image file")
        parent = folder.parent if str(folder.parent) else Path(".")
        if not parent.is_dir():
            raise OutputError(f"cannot create {option} folder {folder}: {parent} is not a folder")
        if not os.access(parent, os.W_OK):
            raise OutputError(f"cannot create {option} folder {folder}: {parent} is not writable")
    elif not os.access(folder, os.W_OK):
        raise OutputError(f"cannot write into {option} folder {folder}: it is not writable")
    return folder


def _image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file's header (cheap: no decoding)."""
    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except Exception as e:   # PIL raises UnidentifiedImageError, OSError, SyntaxError... for bad files
        raise InputError(f"cannot read image {path} ({type(e).__name__})") from None


def predict_folder(model, folder, *, boxes=None, points=None, labels=None, output, overlay=None,
                   multimask: bool = False, runtime="ort", device=None, provider=None, force: bool = False,
                   prompts_file=None, progress: bool = False, threads: int | None = None) -> FolderOutput:
    """Masks for every image of `folder` (module docstring): the command-line prompts on each image, or each
    image's boxes from `prompts_file`."""
    from tqdm.auto import tqdm

    folder = Path(folder)
    if prompts_file is not None and (boxes is not None or points is not None):
        raise InputError("give the prompts either on the command line (--box / --point) or in --prompts FILE, "
                         "not both")
    if prompts_file is None and boxes is None and points is None:
        raise InputError("give at least one --box X0 Y0 X1 Y1 or --point X Y, or --prompts FILE.json")
    files = list_image_files(folder)
    if not files:
        raise InputError(f"folder {folder} has no image files ({', '.join(IMAGE_SUFFIXES)})")
    by_stem: dict[str, Path] = {}
    for f in files:
        if f.stem in by_stem:
            raise InputError(f"{by_stem[f.stem].name} and {f.name} in {folder} would both write {f.stem}.png; "
                             "rename one")
        by_stem[f.stem] = f
    if provider is not None:
        from ..runtime.providers import ort_providers

        ort_providers(provider)
    mask_dir = _output_folder(output, "-o")
    overlay_dir = _output_folder(overlay, "--overlay") if overlay is not None else None
    if overlay_dir is not None and overlay_dir.resolve() == mask_dir.resolve():
        raise OutputError(f"-o and --overlay name the same folder {mask_dir}; the overlays would replace the masks")
    for option, d in (("-o", mask_dir), ("--overlay", overlay_dir)):
        if d is not None and d.resolve() == folder.resolve():
            raise OutputError(f"{option} {d} is the folder of input images; their PNGs would be replaced by masks "
                              "(name another folder)")
    sizes = {f: _image_size(f) for f in files}
    if prompts_file is not None:
        per_image = load_folder_prompts(prompts_file, files)
        for f, bxs in per_image.items():
            h, w = sizes[f]
            per_image[f] = [check_box_inside(b, h, w, f"image {f.name}") for b in bxs]
            if len(bxs) > MAX_PROMPTS:
                raise InputError(f"{prompts_file}: {len(bxs)} boxes for {f.name}; an 8-bit mask PNG holds at "
                                 f"most {MAX_PROMPTS} prompts")
        todo = [f for f in files if f in per_image]
    else:   # the command-line prompts on every image: checked against each image's size before any work
        per_image = {f: check_prompts_inside(boxes, points, *sizes[f], f"image {f.name}") for f in files}
        todo = files
    targets = {f: (mask_dir / f"{f.stem}.png", overlay_dir / f"{f.stem}.png" if overlay_dir else None) for f in todo}
    for m, o in targets.values():
        for p in (m, o):
            if p is not None and p.exists():
                if p.is_dir():
                    raise OutputError(f"{p} is a directory, not a file path")
                if not force:
                    raise OutputError(f"{p} exists; pass --force to overwrite it")
    predictor = SamOnnxPredictor(model, runtime, device, provider, threads=threads)
    created = [d for d in (mask_dir, overlay_dir) if d is not None and not d.exists()]
    written: list[Path] = []
    results: dict[str, PredictOutput] = {}
    try:
        for d in created:
            try:
                d.mkdir()
            except OSError as e:
                raise OutputError(f"cannot create {d}: {e.strerror or e}") from None
        pts, lbs = (points, labels) if prompts_file is None else (None, None)
        for f in tqdm(todo, desc="predict", unit="img", disable=not progress or None):
            bx = per_image[f]
            pixels = read_image_file(f)
            masks, scores = _predict_masks(predictor, pixels, bx, pts, lbs, multimask)
            m, o = targets[f]
            written.append(save_png(mask_image(masks), m))
            if o is not None:
                written.append(save_png(overlay_image(pixels, masks, bx, pts, lbs), o))
            results[f.name] = PredictOutput(m, o, [float(s) for s in scores], [int(x.sum()) for x in masks],
                                            predictor.description)
    except BaseException:   # failed or interrupted: no partial set of masks is left
        for p in written:
            p.unlink(missing_ok=True)
        for d in reversed(created):
            try:
                d.rmdir()
            except OSError:
                pass
        raise
    return FolderOutput(mask_dir, overlay_dir, results, [f.name for f in files if f not in targets],
                        predictor.description)
