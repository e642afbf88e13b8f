"""evaluate(): plumbing over a tiny exported SAM (full graph split, encoder+decoder pair, official decoder,
per-box fallback), geometry through a box oracle, JSON output, and the bad inputs eval must refuse."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_coco import write_coco  # noqa: E402
from tiny_sam import tiny_sam_paths  # noqa: E402

from carsam_onnx.data.coco import load_coco_dataset  # noqa: E402
from carsam_onnx.errors import InputError, ModelError  # noqa: E402
from carsam_onnx.deploy import engines as predictors  # noqa: E402
from carsam_onnx.eval.metrics import paired_ious  # noqa: E402
from carsam_onnx.deploy.engines import BoxPredictor  # noqa: E402
from carsam_onnx.eval.runner import evaluate, run_predictions, select_prompts  # noqa: E402
from carsam_onnx.samgraph import inspect_sam_model  # noqa: E402

KEYS = {"segm_mAP", "AP50", "AP75", "mIoU", "num_instances"}


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco") / "ds"
    write_coco(root, num_images=3, crowd=True)
    return load_coco_dataset(root)


@pytest.fixture(scope="module")
def tiny():
    return tiny_sam_paths()


def _check_ranges(r):
    d = r.to_json()
    assert KEYS <= set(d)
    for k in ("segm_mAP", "AP50", "AP75"):
        assert 0.0 <= d[k] <= 100.0
    assert 0.0 <= d["mIoU"] <= 1.0


# ---- geometry: an oracle that answers each box with the box itself ---------------------------------------------
class BoxOracle(BoxPredictor):
    """Low-res logits +20 inside the prompted box (in the S x S frame), -20 outside."""

    description = "box oracle"

    def __init__(self, image_size, swap_xy=False):
        self.image_size, self.swap = image_size, swap_xy

    def set_image(self, image, geo):
        assert image.shape == (1, 3, self.image_size, self.image_size)
        return 0.0

    def predict(self, coords, labels):
        s = self.image_size // 4
        c = (np.arange(s) + 0.5) * 4  # low-res pixel centres in the S frame
        out = []
        for (x0, y0), (x1, y1) in coords:
            if self.swap:
                x0, y0, x1, y1 = y0, x0, y1, x1
            inside = ((c[:, None] >= y0) & (c[:, None] <= y1)) & ((c[None, :] >= x0) & (c[None, :] <= x1))
            out.append(np.where(inside, 20.0, -20.0))
        return np.asarray(out, np.float32), np.full(len(coords), 0.5, np.float32)


def test_box_oracle_recovers_rectangles(ds):
    by_image, ids, _ = select_prompts(ds, "gt", None)
    preds, per_image = run_predictions(BoxOracle(1024), ds, by_image, progress=False)
    ious = paired_ious(ds, preds)
    kinds = [ds.annotation(p.ann_id)["category_id"] for p in preds]  # 1: rectangle, 2: ellipse
    rect = ious[np.array(kinds) == 1]
    ell = ious[np.array(kinds) == 2]
    assert len(rect) == len(ell) == 3 and [r["num_prompts"] for r in per_image] == [2, 2, 2]
    assert rect.min() > 0.95                           # a box mask is the rectangle, up to resampling
    assert abs(ell.mean() - np.pi / 4) < 0.06          # an ellipse fills pi/4 of its box
    swapped, _ = run_predictions(BoxOracle(1024, swap_xy=True), ds, by_image, progress=False)
    assert paired_ious(ds, swapped).mean() < 0.5 * ious.mean()  # the check can tell a geometry bug


# ---- a real (tiny) SAM graph ----------------------------------------------------------------------------------
def test_inspect_recognises_sam_graphs(tiny):
    kinds = {k: inspect_sam_model(onnx.load(str(p), load_external_data=False)) for k, p in tiny.items()}
    assert {k: v.kind for k, v in kinds.items()} == {"full": "full", "encoder": "encoder", "decoder": "decoder",
                                                    "official_decoder": "official_decoder"}
    assert all(v.image_size == 128 for v in kinds.values())


def test_full_split_pair_and_per_box_agree(ds, tiny, tmp_path, monkeypatch):
    full = evaluate(tiny["full"], ds, progress=False)
    pair = evaluate([tiny["decoder"], tiny["encoder"]], ds, progress=False)  # either order
    assert "split at" in full.model and full.image_size == 128
    for r in (full, pair):
        _check_ranges(r)
        assert r.num_instances == 6 and r.num_images == 3 and len(r.per_image) == 3
    for k in ("segm_mAP", "AP50", "AP75", "mIoU"):
        assert getattr(full, k) == pytest.approx(getattr(pair, k), abs=1e-9)

    def no_split(model, *a, **kw):
        raise ModelError("forced")
    monkeypatch.setattr(predictors, "split_full_model", no_split)
    with pytest.warns(UserWarning, match="once per box"):
        per_box = evaluate(tiny["full"], ds, progress=False, limit=2)
    assert "per box" in per_box.model and per_box.num_images == 2 and per_box.num_instances == 4
    monkeypatch.undo()
    split2 = evaluate(tiny["full"], ds, progress=False, limit=2)
    for k in ("segm_mAP", "AP50", "AP75", "mIoU"):
        assert getattr(per_box, k) == pytest.approx(getattr(split2, k), abs=1e-9)

    out = full.write_json(tmp_path / "r.json")
    data = json.loads(out.read_text())
    assert KEYS <= set(data) and data["num_instances"] == 6 and data["prompts"] == "gt"
    assert {"encoder_s_median", "decoder_s_per_prompt", "total_s"} <= set(data["timings"])
    assert "segm mAP" in full.summary()


def test_eval_records_its_thread_count_and_the_cpu(ds, tiny):
    """A Q/DQ model's score depends on ONNX Runtime's thread count and on the CPU's kernels (docs/results.md, "ORT
    against itself"): the JSON records both; the same count gives the same score, and 0 threads is refused."""
    from carsam_onnx.config import EvalConfig
    from carsam_onnx.runtime.ort_settings import host_isa_flags
    a, b = (evaluate(tiny["full"], ds, progress=False, threads=1) for _ in range(2))
    assert a.to_json()["threads"] == 1 and a.cpu_flags == host_isa_flags() != ""
    assert (a.segm_mAP, a.mIoU) == (b.segm_mAP, b.mIoU)
    assert evaluate(tiny["full"], ds, progress=False, limit=1).threads is None    # ORT's own default
    with pytest.raises(InputError, match="--threads 0: must be >= 1"):
        EvalConfig(threads=0)


def test_official_decoder_and_detector_prompts(ds, tiny, tmp_path):
    r = evaluate([tiny["encoder"], tiny["official_decoder"]], ds, progress=False)
    _check_ranges(r)
    assert r.num_instances == 6
    det = tmp_path / "det.json"
    det.write_text(json.dumps([{"image_id": 100, "bbox": [5, 5, 40, 30], "category_id": 1, "score": 0.8},
                               {"image_id": 102, "bbox": [10, 20, 50, 50], "category_id": 2, "score": 0.3}]))
    r = evaluate(tiny["full"], ds, prompts=det, progress=False)
    _check_ranges(r)
    assert r.num_instances == 2 and r.num_images == 3 and r.prompts == "det.json"
    assert len(r.per_image) == 2  # image 101 has no boxes: nothing to run, but it counts for recall


# ---- bad input -------------------------------------------------------------------------------------------------
NOT_SAM = """
<ir_version: 10, opset_import: ["" : 21]>
g (float[1,3,8,8] x) => (float[1,3,8,8] y) { y = Relu(x) }
"""


def _save(tmp_path, text, name):
    p = tmp_path / name
    onnx.save(onnx.parser.parse_model(text), str(p))
    return p


def test_bad_models(ds, tiny, tmp_path):
    with pytest.raises(ModelError, match="is not a SAM graph: inputs \\['x'\\]"):
        evaluate(_save(tmp_path, NOT_SAM, "relu.onnx"), ds, progress=False)
    with pytest.raises(ModelError, match="is a SAM encoder; give its decoder as well"):
        evaluate(tiny["encoder"], ds, progress=False)
    with pytest.raises(ModelError, match="is a SAM decoder; give its image encoder as well"):
        evaluate(tiny["decoder"], ds, progress=False)
    with pytest.raises(ModelError, match="a pair must be an image encoder and a decoder"):
        evaluate([tiny["encoder"], tiny["encoder"]], ds, progress=False)
    with pytest.raises(ModelError, match="model not found"):
        evaluate(tmp_path / "nope.onnx", ds, progress=False)
    (tmp_path / "trunc.onnx").write_bytes(tiny["decoder"].read_bytes()[:1000])
    with pytest.raises(ModelError):
        evaluate(tmp_path / "trunc.onnx", ds, progress=False)
    gray = NOT_SAM.replace("float[1,3,8,8] x) => (float[1,3,8,8] y) { y = Relu(x) }",
                           "float[1,1,64,64] image) => (float[1,256,4,4] e) { e = Relu(image) }")
    with pytest.raises(ModelError, match="has 1 channels; SAM takes 3"):
        evaluate([_save(tmp_path, gray, "gray.onnx"), tiny["decoder"]], ds, progress=False)
    other = tiny_sam_encoder_of_size(tmp_path, 256)
    with pytest.raises(ModelError, match="takes 256 px images but .* expects embeddings of a 128 px image"):
        evaluate([other, tiny["decoder"]], ds, progress=False)


def tiny_sam_encoder_of_size(tmp_path, size):
    text = f"""
<ir_version: 10, opset_import: ["" : 21]>
g (float[1,3,{size},{size}] image) => (float[1,256,{size // 16},{size // 16}] image_embeddings)
<int64[4] shape = {{1, 256, {size // 16}, {size // 16}}}>
{{ image_embeddings = Reshape(image, shape) }}
"""
    return _save(tmp_path, text, f"enc{size}.onnx")


def test_bad_eval_arguments(ds, tiny, tmp_path):
    det = tmp_path / "other_split.json"
    det.write_text(json.dumps([{"image_id": 4242, "bbox": [1, 1, 5, 5], "category_id": 1, "score": 0.5}]))
    with pytest.raises(InputError, match="not in annotations.json"):
        evaluate(tiny["full"], ds, prompts=det, progress=False)
    with pytest.raises(InputError, match="--limit 0"):
        evaluate(tiny["full"], ds, limit=0, progress=False)
    with pytest.raises(InputError, match="--runtime 'tensorrt' is not available"):
        evaluate(tiny["full"], ds, runtime="tensorrt", progress=False)


def test_multimask_outputs_keep_the_best_predicted_mask():
    from carsam_onnx.deploy.engines import _pick_best
    masks = np.stack([np.full((1, 3, 4, 4), v, np.float32) for v in (1.0, 2.0)])  # two prompts, 3 masks each
    masks[0, 0, 2] = 7.0
    masks[1, 0, 0] = 9.0
    outs = [{"low_res_masks": masks[0], "iou_predictions": np.array([[0.1, 0.2, 0.9]], np.float32)},
            {"low_res_masks": masks[1], "iou_predictions": np.array([[0.8, 0.2, 0.1]], np.float32)}]
    low, iou = _pick_best(outs)
    assert low.shape == (2, 4, 4) and (low[0] == 7.0).all() and (low[1] == 9.0).all()
    assert iou.tolist() == pytest.approx([0.9, 0.8])
