"""SamOnnxPredictor and `carsam-onnx predict` / `split` on the tiny SAM: predict writes the mask eval scores,
the official decoder export predicts like the project's graphs, split cuts at the image embedding exactly."""
from __future__ import annotations

import io
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from carsam_onnx.cli import main
from carsam_onnx.data.coco import load_coco_dataset
from carsam_onnx.deploy.predictor import SamOnnxPredictor, encode_prompts
from carsam_onnx.data.preprocess import Geometry
from carsam_onnx.data.prompts import xywh_to_xyxy
from carsam_onnx.errors import InputError
from carsam_onnx.eval.runner import run_predictions, select_prompts
from tiny_coco import write_coco
from tiny_sam import tiny_sam_paths


@pytest.fixture(scope="module")
def tiny():
    return tiny_sam_paths()


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    write_coco(root, seed=3, num_images=2)
    return load_coco_dataset(root)


def _iou(a, b):
    return np.logical_and(a, b).sum() / max(np.logical_or(a, b).sum(), 1)


def test_predict_png_is_the_mask_eval_scores(tiny, ds, tmp_path, capsys):
    by_image, _, _ = select_prompts(ds, "gt", None)
    image_id = sorted(by_image)[0]
    prompt = by_image[image_id][0]
    preds, _ = run_predictions(SamOnnxPredictor(tiny["full"]), ds, {image_id: [prompt]}, progress=False)
    eval_mask = mask_utils.decode(preds[0].rle).astype(bool)
    assert eval_mask.sum() > 0
    image = ds.images_dir / ds.images[image_id].file_name
    out, ov = tmp_path / "mask.png", tmp_path / "overlay.png"
    argv = ["predict", str(tiny["full"]), str(image), "--box", *map(str, prompt.box_xyxy), "-o", str(out),
            "--overlay", str(ov)]
    assert main(argv) == 0
    png = np.asarray(Image.open(out))
    assert png.dtype == np.uint8 and set(np.unique(png)) <= {0, 255}
    assert _iou(png == 255, eval_mask) == 1.0 and ((png == 255) == eval_mask).all()
    with Image.open(ov) as im:
        im.verify()
    with Image.open(ov) as im:
        assert im.size == (png.shape[1], png.shape[0]) and im.mode == "RGB"
    assert "predicted IoU" in capsys.readouterr().out
    assert main(argv) == 2                      # exists without --force: one line, exit 2
    assert main(argv + ["--force", "--provider", "cpu"]) == 0
    assert main(argv + ["--force", "--threads", "1"]) == 0    # ONNX Runtime's thread count fixed: the same mask
    assert (np.asarray(Image.open(out)) == png).all()


def test_points_multimask_and_pairs(tiny, ds):
    image = ds.read_image(ds.image_ids[0])
    h, w = image.shape[:2]
    full = SamOnnxPredictor(tiny["full"]).set_image(image)
    pair = SamOnnxPredictor([tiny["decoder"], tiny["encoder"]]).set_image(image)
    box = [[5, 5, w - 10, h - 12], [10, 20, 40, 60]]
    a, b = full.predict(boxes=box), pair.predict(boxes=box)
    assert a.masks.shape == (2, h, w) and a.scores.shape == (2,) and a.low_res_logits.shape == (2, 32, 32)
    np.testing.assert_allclose(a.low_res_logits, b.low_res_logits, atol=1e-4)
    pts = full.predict(points=[[20, 30], [50, 40]], labels=[1, 0], multimask=True)
    assert pts.masks.shape == (1, 1, h, w) and pts.scores.shape == (1, 1)
    both = full.predict(boxes=box[0], points=[[20, 30]])
    assert both.masks.shape == (1, h, w)
    with pytest.raises(InputError, match="box or at least one point"):
        full.predict()
    with pytest.raises(InputError, match="x1 > x0"):
        full.predict(boxes=[10, 10, 5, 20])


def test_prompt_encoding_follows_sam_onnx_convention():
    geo = Geometry.of(100, 200, 128)            # scale 0.64
    c, lab = encode_prompts(geo, points=[[100, 50]], labels=[0])
    np.testing.assert_allclose(c, [[[64, 32], [0, 0]]], atol=1e-4)
    assert lab.tolist() == [[0, -1]]            # padding point when there is no box
    c, lab = encode_prompts(geo, boxes=[[0, 0, 100, 50]], points=[[100, 50]])
    assert lab.tolist() == [[1, 2, 3]] and c.shape == (1, 3, 2)


def test_official_decoder_predicts_like_its_own_masks_output(tiny, ds):
    """segment-anything's export: our postprocessing of its low_res_masks equals its own `masks` output.
    (At the original size its TorchScript trace was made with, 100 x 150: the trace bakes the crop of the padded
    frame into constants, so at other sizes only low_res_masks, which predict and eval use, stays right.)"""
    image = np.random.default_rng(1).integers(0, 255, (100, 150, 3)).astype(np.uint8)
    pred = SamOnnxPredictor([tiny["encoder"], tiny["official_decoder"]]).set_image(image)
    h, w = image.shape[:2]
    out = pred.predict(boxes=[[8, 8, w - 20, h - 30]])
    feeds = {**pred.engine._state, "point_coords": encode_prompts(pred.geometry, boxes=[[8, 8, w - 20, h - 30]])[0],
             "point_labels": np.array([[2.0, 3.0]], np.float32)}
    sess = ort.InferenceSession(str(tiny["official_decoder"]))
    masks = sess.run(["masks"], feeds)[0][0, 0] > 0
    assert masks.shape == (h, w) and _iou(masks, out.masks[0]) > 0.99


def test_split_cuts_at_the_embedding(tiny, tmp_path, capsys):
    assert main(["split", str(tiny["full"]), "-o", str(tmp_path / "t.onnx")]) == 0
    enc, dec = tmp_path / "t.encoder.onnx", tmp_path / "t.decoder.onnx"
    d = onnx.load(str(dec))
    assert [i.name for i in d.graph.input] == ["image_embeddings", "point_coords", "point_labels"]
    assert d.graph.input[1].type.tensor_type.shape.dim[1].dim_param     # dynamic point count
    rng = np.random.default_rng(0)
    img = rng.normal(size=(1, 3, 128, 128)).astype(np.float32)
    e = ort.InferenceSession(str(enc)).run(None, {"image": img})[0]
    e_ref = ort.InferenceSession(str(tiny["encoder"])).run(None, {"image": img})[0]
    np.testing.assert_allclose(e, e_ref, atol=1e-5)       # the cut is the embedding export --split writes
    full = ort.InferenceSession(str(tiny["full"]))
    dsess = ort.InferenceSession(str(dec))
    for n in (1, 4):
        feed = {"point_coords": rng.uniform(0, 128, (1, n, 2)).astype(np.float32),
                "point_labels": np.array([[1] * (n - 1) + [-1]], np.float32)}
        ref = full.run(None, {"image": img, **feed})
        got = dsess.run(None, {"image_embeddings": e, **feed})
        for r, g in zip(ref, got):
            np.testing.assert_array_equal(r, g)
    assert main(["split", str(tiny["encoder"]), "-o", str(tmp_path / "x.onnx")]) == 2


def test_split_of_a_qdq_model(tiny, tmp_path):
    q = tmp_path / "q.onnx"
    assert main(["-q", "quantize", str(tiny["full"]), "-o", str(q), "--bits", "w8a8", "--num-calib", "1"]) == 0
    assert main(["-q", "split", str(q)]) == 0
    enc, dec = tmp_path / "q.encoder.onnx", tmp_path / "q.decoder.onnx"
    d = onnx.load(str(dec))
    assert sum(n.op_type == "DequantizeLinear" for n in d.graph.node) > 20
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL   # same kernels on both sides
    rng = np.random.default_rng(1)
    img = rng.normal(size=(1, 3, 128, 128)).astype(np.float32)
    feed = {"point_coords": np.array([[[10.0, 12.0], [90.0, 100.0]]], np.float32),
            "point_labels": np.array([[2.0, 3.0]], np.float32)}
    ref = ort.InferenceSession(str(q), so).run(None, {"image": img, **feed})
    e = ort.InferenceSession(str(enc), so).run(None, {"image": img})[0]
    got = ort.InferenceSession(str(dec), so).run(None, {"image_embeddings": e, **feed})
    for r, g in zip(ref, got):
        np.testing.assert_array_equal(r, g)


# ---- predict over a folder of images ---------------------------------------------------------------------------
class _TTY(io.StringIO):
    """stderr as a terminal: tqdm shows its bar only on a TTY (disable=None), as the commands ask it to."""

    def isatty(self):
        return True


def _png(path):
    with Image.open(path) as im:
        return np.asarray(im)


def test_folder_mode_writes_the_single_image_masks(tiny, ds, tmp_path, monkeypatch):
    """A folder: one mask PNG per image, the bytes' pixels equal to predict on that image alone, with the command
    line's prompts (same on every image) and with --prompts (the annotations file, one box per annotation);
    a progress bar on stderr, none with --quiet."""
    images = ds.images_dir
    files = sorted(images.glob("*.png"))
    assert len(files) == 2
    err = _TTY()
    monkeypatch.setattr(sys, "stderr", err)
    box = ["--box", "5", "5", "70", "60"]
    assert main(["predict", str(tiny["full"]), str(images), *box, "--point", "30", "30", "-o",
                 str(tmp_path / "masks"), "--overlay", str(tmp_path / "ov")]) == 0
    assert "predict" in err.getvalue() and "2/2" in err.getvalue()        # tqdm's bar, on stderr
    for f in files:
        single = tmp_path / f"single_{f.stem}.png"
        assert main(["-q", "predict", str(tiny["full"]), str(f), *box, "--point", "30", "30", "-o", str(single)]) == 0
        folder_png = _png(tmp_path / "masks" / f"{f.stem}.png")
        assert folder_png.shape == ds.read_image(ds.image_id_for_file(f.name)).shape[:2]
        np.testing.assert_array_equal(folder_png, _png(single))
        assert (folder_png == 255).any()
        with Image.open(tmp_path / "ov" / f"{f.stem}.png") as im:
            assert im.mode == "RGB" and im.size == folder_png.shape[::-1]
    # --prompts: every annotation of an image is one box prompt on it, as --box ... --box ... on that image
    ann = ds.annotations_path
    err.seek(0)
    err.truncate()
    assert main(["-q", "predict", str(tiny["full"]), str(images), "--prompts", str(ann), "-o",
                 str(tmp_path / "p")]) == 0
    assert err.getvalue() == ""                                           # --quiet: no bar
    for f in files:
        anns = ds.annotations(ds.image_id_for_file(f.name))
        argv = [a for x in anns for a in ("--box", *(str(v) for v in xywh_to_xyxy(x["bbox"])))]
        single = tmp_path / f"single_p_{f.stem}.png"
        assert main(["-q", "predict", str(tiny["full"]), str(f), *argv, "-o", str(single)]) == 0
        got = _png(tmp_path / "p" / f"{f.stem}.png")
        np.testing.assert_array_equal(got, _png(single))
        assert set(np.unique(got)) <= set(range(len(anns) + 1)) and len(anns) >= 2


def test_folder_mode_leaves_nothing_when_an_image_fails(tiny, ds, tmp_path):
    """The masks written before a failing image are removed with the output folder the run made."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    good = sorted(ds.images_dir.glob("*.png"))
    for f in good:
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "zz_truncated.png").write_bytes(good[0].read_bytes()[:80])   # header readable, pixels not
    out = tmp_path / "masks"
    assert main(["predict", str(tiny["full"]), str(folder), "--box", "5", "5", "40", "40", "-o", str(out)]) == 2
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["predict", str(tiny["full"]), str(folder), "--box", "5", "5", "40", "40", "-o", str(out)]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_folder_prompts_file_formats(tmp_path):
    """--prompts: an instances file (ids -> file names) or detection results by file_name / numeric image_id."""
    from carsam_onnx.data.prompts import load_folder_prompts

    files = [tmp_path / "000000000007.png", tmp_path / "cat.jpg"]
    inst = {"images": [{"id": 1, "file_name": "cat.jpg"}, {"id": 2, "file_name": "000000000007.png"}],
            "annotations": [{"image_id": 1, "bbox": [1, 2, 3, 4]}, {"image_id": 2, "bbox": [0, 0, 5, 5]},
                            {"image_id": 1, "bbox": [2, 2, 2, 2]}]}
    (tmp_path / "i.json").write_text(json.dumps(inst))
    got = load_folder_prompts(tmp_path / "i.json", files)
    assert got == {files[1]: [(1, 2, 4, 6), (2, 2, 4, 4)], files[0]: [(0, 0, 5, 5)]}
    dets = [{"file_name": "cat.jpg", "bbox": [1, 2, 3, 4], "score": 0.9}, {"image_id": 7, "bbox": [0, 0, 5, 5]}]
    (tmp_path / "d.json").write_text(json.dumps(dets))
    assert load_folder_prompts(tmp_path / "d.json", files) == {files[1]: [(1, 2, 4, 6)], files[0]: [(0, 0, 5, 5)]}
    (tmp_path / "u.json").write_text(json.dumps([{"image_id": 8, "bbox": [0, 0, 5, 5]}]))
    with pytest.raises(InputError, match="image_id 8.*not an image in"):
        load_folder_prompts(tmp_path / "u.json", files)
