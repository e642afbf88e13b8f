"""COCO-format loading, box prompts (ground truth and detector results) and the calibration set."""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from segment_anything.utils.transforms import ResizeLongestSide

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "eval"))
from tiny_coco import write_coco  # noqa: E402

from carsam_onnx.data.coco import CocoDataset, load_coco_dataset  # noqa: E402
from carsam_onnx.data.preprocess import Geometry, preprocess_image  # noqa: E402
from carsam_onnx.data.prompts import (box_inputs, gt_box_prompts, load_calibration_set,  # noqa: E402
                                      load_detection_prompts)
from carsam_onnx.errors import CalibrationError, CarsamError, InputError  # noqa: E402


def _iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


@pytest.fixture
def coco_dir(tmp_path):
    _, _, drawn = write_coco(tmp_path / "ds", crowd=True)
    return tmp_path / "ds", drawn


# ---- loading ----------------------------------------------------------------------------------------------
def test_dataset_folder_layout_reads_rle_and_polygons(coco_dir):
    root, drawn = coco_dir
    ds = load_coco_dataset(root)
    assert ds.image_ids == [100, 101, 102] and len(ds) == 3
    for image_id, (image, objs) in zip(ds.image_ids, drawn):
        assert (ds.read_image(image_id) == image).all()  # PNG round trip is lossless
        anns = [a for a in ds.annotations(image_id) if not a["iscrowd"]]
        assert len(anns) == len(objs)
        for ann, (mask, cat, kind) in zip(anns, objs):
            got = ds.ann_mask(ann)
            assert ann["category_id"] == cat and got.shape == mask.shape
            # RLE is exact; a polygon traced through boundary pixel centres loses a thin rim
            assert _iou(got, mask) == 1.0 if kind == "rle" else _iou(got, mask) > 0.85


def test_standard_coco_layout(tmp_path):
    images, ann, _ = write_coco(tmp_path, layout="coco", num_images=2)
    ds = load_coco_dataset(images=images, annotations=ann)
    assert len(ds) == 2 and ds.read_image(101).shape == (150, 100, 3)
    assert ds.image_id_for_file("000000000101.png") == 101 and ds.image_id_for_file("nope.png") is None


def test_missing_fields_are_filled(tmp_path):
    images, ann, drawn = write_coco(tmp_path, layout="coco", num_images=1)
    data = json.loads(ann.read_text())
    for a in data["annotations"]:
        for k in ("id", "area", "iscrowd", "bbox"):
            a.pop(k)
    data.pop("categories")
    ann.write_text(json.dumps(data))
    ds = CocoDataset(images, ann)
    anns = ds.annotations(100)
    assert len({a["id"] for a in anns}) == 2 and all(a["iscrowd"] == 0 for a in anns)
    mask = drawn[0][1][0][0]
    assert anns[0]["area"] == mask.sum()
    ys, xs = np.nonzero(mask)
    assert anns[0]["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    assert {c["id"] for c in ds.categories} == {1, 2}


@pytest.mark.parametrize("breakage, message", [
    ("no_annotations", "has no annotations.json"),
    ("no_images_dir", "has no images/ folder"),
    ("not_a_dir", "dataset folder not found"),
    ("bad_json", "not valid JSON"),
    ("not_coco", "not a COCO annotations file"),
    ("missing_image", "1 of 3 images listed in annotations.json are missing"),
    ("unknown_image_ref", "refers to image id 999"),
    ("no_images", "lists no images"),
    ("bad_segmentation", "neither polygons nor RLE"),
])
def test_bad_dataset_folder(coco_dir, breakage, message):
    root, _ = coco_dir
    ann = root / "annotations.json"
    data = json.loads(ann.read_text())
    if breakage == "no_annotations":
        ann.unlink()
    elif breakage == "no_images_dir":
        for p in (root / "images").iterdir():
            p.unlink()
        (root / "images").rmdir()
    elif breakage == "not_a_dir":
        root = root / "nothing_here"
    elif breakage == "bad_json":
        ann.write_text("{\"images\": [")
    elif breakage == "not_coco":
        ann.write_text(json.dumps([1, 2]))
    elif breakage == "missing_image":
        (root / "images" / data["images"][1]["file_name"]).unlink()
    elif breakage == "unknown_image_ref":
        data["annotations"][0]["image_id"] = 999
        ann.write_text(json.dumps(data))
    elif breakage == "no_images":
        ann.write_text(json.dumps({"images": [], "annotations": []}))
    elif breakage == "bad_segmentation":
        data["annotations"][0]["segmentation"] = "abc"
        data["annotations"][0].pop("area")
        ann.write_text(json.dumps(data))
    with pytest.raises(InputError, match=message) as e:
        load_coco_dataset(root)
    assert "\n" not in str(e.value)


def test_layout_arguments_are_checked(coco_dir, tmp_path):
    root, _ = coco_dir
    with pytest.raises(InputError, match="not both"):
        load_coco_dataset(root, images=root / "images", annotations=root / "annotations.json")
    with pytest.raises(InputError, match="both --images DIR and --annotations"):
        load_coco_dataset(images=root / "images")
    with pytest.raises(InputError, match="annotations file not found"):
        load_coco_dataset(images=root / "images", annotations=tmp_path / "nope.json")


def test_image_size_mismatch_and_unreadable_image(coco_dir):
    root, _ = coco_dir
    ds = load_coco_dataset(root)
    (root / "images" / "000000000100.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="cannot read image"):
        ds.read_image(100)
    from PIL import Image
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(root / "images" / "000000000101.png")
    with pytest.raises(InputError, match="is 10x10 but annotations.json says 150x100"):
        ds.read_image(101)


# ---- prompts ----------------------------------------------------------------------------------------------
def test_gt_prompts_skip_crowd(coco_dir):
    ds = load_coco_dataset(coco_dir[0])
    prompts = gt_box_prompts(ds)
    assert sorted(prompts) == [100, 101, 102]
    assert all(len(v) == 2 for v in prompts.values())  # the crowd region of each image is not prompted
    p = prompts[100][0]
    ann = ds.annotation(p.ann_id)
    x, y, w, h = ann["bbox"]
    assert p.box_xyxy == (x, y, x + w, y + h) and p.category_id == ann["category_id"] and p.score is None


def test_box_inputs_match_apply_boxes():
    geo = Geometry.of(480, 640, 1024)
    boxes = np.array([[10.0, 20.0, 300.0, 400.0], [0.0, 0.0, 640.0, 480.0]])
    coords, labels = box_inputs(boxes, geo)
    assert coords.shape == (2, 2, 2) and labels.shape == (2, 2) and coords.dtype == labels.dtype == np.float32
    np.testing.assert_allclose(coords.reshape(2, 4), ResizeLongestSide(1024).apply_boxes(boxes, (480, 640)), atol=1e-4)
    assert (labels == [[2, 3], [2, 3]]).all()


def _write_results(path, entries):
    path.write_text(json.dumps(entries))
    return path


def test_detection_prompts(coco_dir, tmp_path):
    ds = load_coco_dataset(coco_dir[0])
    f = _write_results(tmp_path / "det.json", [
        {"image_id": 100, "bbox": [5, 6, 20, 30], "category_id": 1, "score": 0.9},
        {"file_name": "000000000101.png", "bbox": [-0.5, 0, 100.4, 150], "category_id": 2, "score": 0.4},
        {"image_id": 100, "bbox": [1, 1, 2, 2], "category_id": 2, "score": 0.01},
    ])
    prompts = load_detection_prompts(f, ds, min_score=0.05)
    assert sorted(prompts) == [100, 101] and len(prompts[100]) == 1
    assert prompts[100][0].box_xyxy == (5, 6, 25, 36) and prompts[100][0].score == 0.9
    assert prompts[101][0].box_xyxy == (0.0, 0.0, 99.9, 150.0)  # clipped to the image
    assert prompts[101][0].ann_id is None


@pytest.mark.parametrize("entry, message", [
    ({"image_id": 555, "bbox": [1, 1, 5, 5], "category_id": 1}, "not in annotations.json.*another split"),
    ({"image_id": 100, "bbox": [150, 1, 50, 5], "category_id": 1}, "lies outside image 100"),
    ({"image_id": 100, "bbox": [1, 1, 0, 5], "category_id": 1}, "empty bbox"),
    ({"image_id": 100, "bbox": [1, float("nan"), 2, 5], "category_id": 1}, "non-finite bbox"),
    ({"image_id": 100, "bbox": [1, 1, 2, 5]}, "no category_id"),
    ({"image_id": 100, "box": [1, 1, 2, 5]}, "needs a 'bbox'"),
])
def test_bad_detection_prompts(coco_dir, tmp_path, entry, message):
    ds = load_coco_dataset(coco_dir[0])
    f = _write_results(tmp_path / "det.json", [entry])
    with pytest.raises(InputError, match=message):
        load_detection_prompts(f, ds)


def test_detection_prompts_file_errors(coco_dir, tmp_path):
    ds = load_coco_dataset(coco_dir[0])
    with pytest.raises(InputError, match="prompts file not found"):
        load_detection_prompts(tmp_path / "none.json", ds)
    (tmp_path / "x.json").write_text("{")
    with pytest.raises(InputError, match="not readable JSON"):
        load_detection_prompts(tmp_path / "x.json", ds)
    (tmp_path / "y.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(InputError, match="not a COCO detection-results list"):
        load_detection_prompts(tmp_path / "y.json", ds)


# ---- calibration set --------------------------------------------------------------------------------------
def _image_folder(tmp_path, n=4):
    """A plain folder of images (no annotations next to it)."""
    images, _, drawn = write_coco(tmp_path / "src", num_images=n)
    plain = tmp_path / "plain"
    images.rename(plain)
    return plain, drawn


def test_calibration_random_boxes(tmp_path):
    folder, drawn = _image_folder(tmp_path)
    a = load_calibration_set(folder, None, num=3, seed=0, image_size=256)
    b = load_calibration_set(folder, None, num=3, seed=0, image_size=256)
    c = load_calibration_set(folder, None, num=3, seed=1, image_size=256)
    assert len(a) == 3
    for s in a:
        assert s.image.shape == (1, 3, 256, 256) and s.image.dtype == np.float32
        assert s.point_coords.shape == (1, 2, 2) and (s.point_labels == [[2, 3]]).all()
        assert (s.point_coords >= 0).all() and (s.point_coords <= 256).all()
        x0, y0, x1, y1 = s.box_xyxy
        assert x1 > x0 and y1 > y0
    assert [s.box_xyxy for s in a] == [s.box_xyxy for s in b]  # seeded
    assert [s.box_xyxy for s in a] != [s.box_xyxy for s in c]


def test_calibration_with_prompts_file_and_dataset_folder(tmp_path):
    folder, _ = _image_folder(tmp_path)
    f = _write_results(tmp_path / "calib.json", [
        {"image_id": 100, "bbox": [5, 6, 20, 30], "score": 1.0},
        {"file_name": "000000000102.png", "bbox": [1, 2, 50, 60]},
    ])
    with pytest.warns(UserWarning, match="has 2 images with boxes; using all of them"):
        samples = load_calibration_set(folder, f, num=32, seed=0, image_size=128)
    assert sorted(s.source for s in samples) == ["000000000100.png", "000000000102.png"]
    # quantize draws --num-calib plus held-out images: short only below what the user asked for, named as asked
    with pytest.warns(UserWarning, match="has 2 images with boxes; using all of them instead of --num-calib 3$"):
        load_calibration_set(folder, f, num=5, seed=0, image_size=128, asked=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_calibration_set(folder, f, num=4, seed=0, image_size=128, asked=2)) == 2
    s100 = next(s for s in samples if s.source == "000000000100.png")
    geo = Geometry.of(96, 160, 128)
    np.testing.assert_allclose(s100.point_coords[0], box_inputs(np.array([5, 6, 25, 36]), geo)[0][0], atol=1e-5)
    # a COCO-layout dataset folder (or its images/ folder) without a prompts file: its ground-truth boxes
    write_coco(tmp_path / "ds", num_images=3)
    ds = load_coco_dataset(tmp_path / "ds")
    boxes = {p.box_xyxy for v in gt_box_prompts(ds).values() for p in v}
    for where in (tmp_path / "ds", tmp_path / "ds" / "images"):
        gt = load_calibration_set(where, None, num=2, seed=0, image_size=128)
        assert len(gt) == 2 and all(s.box_xyxy in boxes for s in gt)


def test_calibration_image_ids_follow_the_dataset_annotations(tmp_path):
    """In a dataset folder whose file names are not the ids (as data/synth.py writes them: id 1 is 000000.png),
    a prompts file's image_id means the annotations' id, not the number in a file name."""
    images, ann, drawn = write_coco(tmp_path / "ds", num_images=3)
    data = json.loads(ann.read_text())
    for k, im in enumerate(data["images"]):
        new = f"{k:06d}.png"
        (images / im["file_name"]).rename(images / new)
        im["file_name"] = new
    ann.write_text(json.dumps(data))
    f = _write_results(tmp_path / "p.json", [{"image_id": 101, "bbox": [1, 2, 30, 40]}])  # the 2nd image
    (s,) = load_calibration_set(tmp_path / "ds", f, num=1, seed=0, image_size=128)
    assert s.source == "000001.png"
    expected, _ = preprocess_image(drawn[1][0], 128)
    np.testing.assert_array_equal(s.image, expected)


def test_calibration_bad_input(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CalibrationError, match="has no images"):
        load_calibration_set(empty, None, 4, 0, 128)
    with pytest.raises(CalibrationError, match="not found"):
        load_calibration_set(tmp_path / "missing", None, 4, 0, 128)
    folder, _ = _image_folder(tmp_path, n=2)
    outside = _write_results(tmp_path / "o.json", [{"image_id": 100, "bbox": [150, 1, 30, 5]}])
    with pytest.raises(CalibrationError, match="lies outside 000000000100.png"):
        load_calibration_set(folder, outside, 4, 0, 128)
    unknown = _write_results(tmp_path / "u.json", [{"image_id": 7, "bbox": [1, 1, 3, 5]}])
    with pytest.raises(CalibrationError, match="not in the calibration folder"):
        load_calibration_set(folder, unknown, 4, 0, 128)
    nan_box = _write_results(tmp_path / "n.json", [{"image_id": 100, "bbox": [1, float("nan"), 3, 5]}])
    with pytest.raises(CalibrationError, match="non-finite"):
        load_calibration_set(folder, nan_box, 4, 0, 128)
    (folder / "000000000105.png").write_bytes(b"garbage")
    with pytest.raises(CalibrationError, match="cannot read image .*000000000105.png"):
        load_calibration_set(folder, None, 3, 0, 128)


def test_calibration_nan_in_array_image(tmp_path):
    folder = tmp_path / "npy"
    folder.mkdir()
    arr = np.full((20, 30, 3), 100.0, np.float32)
    np.save(folder / "a.npy", arr)
    assert load_calibration_set(folder, None, 1, 0, 64)[0].image.shape == (1, 3, 64, 64)
    arr[3, 4, 1] = np.nan
    np.save(folder / "a.npy", arr)
    with pytest.raises(CalibrationError, match="NaN"):
        load_calibration_set(folder, None, 1, 0, 64)


def test_errors_are_carsam_errors():
    assert issubclass(InputError, CarsamError) and issubclass(CalibrationError, CarsamError)


def test_reads_the_synthetic_writer_output(tmp_path):
    synth = pytest.importorskip("carsam_onnx.data.synth", reason="data/synth.py (another part of issue 5) absent")
    synth.write_synthetic_coco(tmp_path / "syn", num_images=2, seed=0, image_size=128)
    ds = load_coco_dataset(tmp_path / "syn")
    assert len(ds) == 2
    prompts = gt_box_prompts(ds)
    n = 0
    for image_id in ds.image_ids:
        assert ds.read_image(image_id).shape == (128, 128, 3)
        for p in prompts.get(image_id, []):
            m = ds.ann_mask(ds.annotation(p.ann_id))
            ys, xs = np.nonzero(m)
            assert m.sum() == ds.annotation(p.ann_id)["area"]
            assert p.box_xyxy == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)  # tight boxes
            n += 1
    assert n >= 2


def test_an_image_beyond_pils_safe_size_is_refused_in_one_line(tmp_path, monkeypatch):
    from PIL import Image

    from carsam_onnx.data.coco import read_image_file

    Image.new("RGB", (30, 20)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 250)      # PIL refuses above twice this: 600 > 500
    with pytest.raises(InputError, match=r"big.png is too large to read safely \(Image size \(600 pixels\) exceeds "
                                         r"limit of 500 pixels\); downscale it first$"):
        read_image_file(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)      # exactly at the limit: read
    assert read_image_file(tmp_path / "big.png").shape == (20, 30, 3)
