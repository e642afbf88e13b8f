"""carsam_onnx.data.synth: deterministic, valid COCO, varied, written atomically."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from scipy.ndimage import binary_fill_holes, binary_opening
from scipy.spatial import ConvexHull

from carsam_onnx.data import synth
from carsam_onnx.data.synth import (CATEGORIES, generate_sample, mask_box_xywh, photo_texture_names, sample_rng,
                                    write_synthetic_coco)
from carsam_onnx.errors import InputError, OutputError


def _read(out):
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    return {str(f): (out / f).read_bytes() for f in files}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "set"
    ann = write_synthetic_coco(out, num_images=6, seed=11, image_size=128)
    return out, ann


def test_same_seed_gives_identical_files(small_set, tmp_path):
    out, _ = small_set
    again = tmp_path / "again"
    write_synthetic_coco(again, num_images=6, seed=11, image_size=128)
    assert _read(out) == _read(again)


def test_image_i_depends_only_on_seed_and_index(small_set, tmp_path):
    out, _ = small_set
    longer = tmp_path / "longer"
    write_synthetic_coco(longer, num_images=8, seed=11, image_size=128)
    for i in range(6):
        name = f"images/{i:06d}.png"
        assert (out / name).read_bytes() == (longer / name).read_bytes()
    img, masks, _ = generate_sample(sample_rng(11, 3), 128)
    assert np.array_equal(np.asarray(Image.open(out / "images/000003.png")), img)


def test_different_seeds_differ(small_set, tmp_path):
    out, _ = small_set
    other = tmp_path / "other"
    write_synthetic_coco(other, num_images=6, seed=12, image_size=128)
    a, b = _read(out), _read(other)
    assert all(a[f"images/{i:06d}.png"] != b[f"images/{i:06d}.png"] for i in range(6))
    assert a["annotations.json"] != b["annotations.json"]


def test_annotations_are_valid_coco(small_set):
    out, ann = small_set
    coco = COCO(str(ann))
    doc = json.loads(ann.read_text())
    assert doc["info"]["seed"] == 11 and doc["info"]["image_size"] == 128
    assert {c["id"] for c in doc["categories"]} == {c["id"] for c in CATEGORIES}
    assert len(coco.getImgIds()) == 6 and len(coco.getAnnIds()) >= 6
    for img in coco.loadImgs(coco.getImgIds()):
        arr = np.asarray(Image.open(out / "images" / img["file_name"]))
        assert arr.shape == (img["height"], img["width"], 3) and arr.dtype == np.uint8
        seen = np.zeros(arr.shape[:2], dtype=bool)
        for a in coco.loadAnns(coco.getAnnIds(imgIds=img["id"])):
            m = coco.annToMask(a).astype(bool)
            assert a["iscrowd"] == 0 and a["category_id"] in coco.getCatIds()
            assert a["area"] == m.sum() > 0                        # RLE area matches the mask
            assert a["bbox"] == mask_box_xywh(m)                   # tight box
            x, y, w, h = a["bbox"]
            assert m[int(y), :].any() and m[int(y + h - 1), :].any() and m[:, int(x)].any() and m[:, int(x + w - 1)].any()
            assert not (seen & m).any()                            # visible parts are disjoint
            seen |= m


def test_masks_match_generator(small_set):
    out, ann = small_set
    coco = COCO(str(ann))
    _, masks, cats = generate_sample(sample_rng(11, 2), 128)
    anns = coco.loadAnns(coco.getAnnIds(imgIds=3))
    assert [a["category_id"] for a in anns] == cats
    for a, m in zip(anns, masks):
        assert np.array_equal(coco.annToMask(a).astype(bool), m)


def test_variety_of_shapes_scales_and_textures():
    """Over 24 images: holes, concave and convex objects, thin parts, a spread of scales, every category,
    and several objects per image."""
    holes = concave = convex = thin = 0
    areas, cats, counts = [], set(), []
    for i in range(24):
        _, masks, cs = generate_sample(sample_rng(5, i), 256)
        counts.append(len(masks))
        cats.update(cs)
        for m in masks:
            area = m.sum()
            areas.append(area)
            if (binary_fill_holes(m) & ~m).sum() >= 20:
                holes += 1
            ys, xs = np.nonzero(m)
            solidity = area / ConvexHull(np.stack([xs, ys], 1)).volume if area > 30 else 1.0
            concave += solidity < 0.75
            convex += solidity > 0.9
            if (m & ~binary_opening(m, np.ones((5, 5), bool))).sum() > 0.25 * area:
                thin += 1
    assert cats == {c["id"] for c in CATEGORIES}
    assert min(holes, concave, convex, thin) >= 5, (holes, concave, convex, thin)
    assert np.median(counts) >= 3
    assert np.percentile(areas, 90) / np.percentile(areas, 10) > 10


def test_photo_textures_when_scikit_image_is_installed():
    pytest.importorskip("skimage", reason="photograph textures come from scikit-image's bundled images")
    names = photo_texture_names()
    assert "astronaut.png" in names and len(names) >= 8


def test_refuses_non_empty_output_unless_force(tmp_path):
    out = tmp_path / "set"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputError, match="not empty"):
        write_synthetic_coco(out, 1, seed=0, image_size=64)
    assert (out / "keep.txt").exists()
    write_synthetic_coco(out, 1, seed=0, image_size=64, force=True)
    assert not (out / "keep.txt").exists() and (out / "annotations.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["set"]  # no temporary folders left behind


def test_empty_existing_folder_is_accepted(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    write_synthetic_coco(out, 1, seed=0, image_size=64)
    assert (out / "images" / "000000.png").exists()


def test_failure_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def boom(rng, size):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return generate_sample(rng, size)

    monkeypatch.setattr(synth, "generate_sample", boom)
    with pytest.raises(RuntimeError):
        write_synthetic_coco(tmp_path / "set", 3, seed=0, image_size=64)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs, match", [({"num_images": 0, "seed": 0}, "num-images"),
                                           ({"num_images": 1, "seed": -1}, "seed"),
                                           ({"num_images": 1, "seed": 0, "image_size": 16}, "32 to 4096"),
                                           ({"num_images": 1, "seed": 0, "image_size": 4097}, "32 to 4096")])
def test_bad_arguments_raise_input_error(tmp_path, kwargs, match):
    with pytest.raises(InputError, match=match):
        write_synthetic_coco(tmp_path / "set", **kwargs)
    assert not (tmp_path / "set").exists()


def test_output_path_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "x"
    f.write_text("")
    with pytest.raises(OutputError):
        write_synthetic_coco(f, 1, seed=0)
    assert os.path.isfile(f)


def test_a_set_that_cannot_fit_on_the_disk_is_refused_before_any_file(tmp_path, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    one = 64 * 64 * synth.PNG_BYTES_PER_PIXEL_LOW        # the low estimate of one 64 px image
    monkeypatch.setattr(synth.shutil, "disk_usage", lambda p: usage(0, 0, int(10 * one)))
    with pytest.raises(OutputError, match=r"--num-images 11: 11 images of 64 px take at least .* GiB free in "):
        write_synthetic_coco(tmp_path / "new" / "set", 11, seed=0, image_size=64)
    assert list(tmp_path.iterdir()) == []
    write_synthetic_coco(tmp_path / "set", 10, seed=0, image_size=64)   # at the estimate: written
    assert len(list((tmp_path / "set" / "images").iterdir())) == 10
