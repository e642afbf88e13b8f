"""--runtime torch: the torch executor gives ORT's masks and metrics, and batches an image's prompts (vmap)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_coco import write_coco  # noqa: E402
from tiny_sam import tiny_sam_paths  # noqa: E402

from carsam_onnx.data.coco import load_coco_dataset  # noqa: E402
from carsam_onnx.errors import InputError  # noqa: E402
from carsam_onnx.eval.metrics import segm_metrics  # noqa: E402
from carsam_onnx.deploy.engines import build_predictor
from carsam_onnx.eval.runner import evaluate, run_predictions, select_prompts  # noqa: E402
from carsam_onnx.runtime import get_runtime  # noqa: E402
from carsam_onnx.runtime.torch_runtime import TorchRuntime  # noqa: E402


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco") / "ds"
    write_coco(root, num_images=3)
    return load_coco_dataset(root)


def _predictions(model, ds, runtime):
    rt = TorchRuntime("cpu", batch_prompts=True) if runtime == "torch" else get_runtime(runtime, "cpu")
    predictor = build_predictor(model, rt)
    by_image, ids, _ = select_prompts(ds, "gt", None)
    preds, _ = run_predictions(predictor, ds, by_image, progress=False)
    return predictor, preds, ids


def test_torch_runtime_matches_ort(ds):
    model = tiny_sam_paths()["full"]
    _, ort_preds, ids = _predictions(model, ds, "ort")
    predictor, torch_preds, _ = _predictions(model, ds, "torch")
    assert predictor.decoder._vmap_ok is True  # the image's two prompts went through in one vmapped call
    assert TorchRuntime("cpu").session(tiny_sam_paths()["decoder"], "d")._vmap_ok is False  # CPU default: a loop
    assert len(ort_preds) == len(torch_preds) == 6
    for a, b in zip(ort_preds, torch_preds):
        assert (a.image_id, a.ann_id) == (b.image_id, b.ann_id)
        assert abs(a.score - b.score) < 1e-4
        same = mask_utils.iou([a.rle], [b.rle], [0])[0, 0]
        assert same > 0.99 or mask_utils.area(a.rle) == mask_utils.area(b.rle) == 0
    m_ort, m_torch = segm_metrics(ds, ort_preds, ids), segm_metrics(ds, torch_preds, ids)
    for k in ("segm_mAP", "AP50", "AP75"):
        assert abs(m_ort[k] - m_torch[k]) <= 0.2
    assert abs(m_ort["mIoU"] - m_torch["mIoU"]) < 1e-3


def test_torch_runtime_pair_and_per_prompt_fallback(ds, monkeypatch):
    paths = tiny_sam_paths()
    ref = evaluate([paths["encoder"], paths["decoder"]], ds, runtime="torch", progress=False)  # CPU: a loop
    assert ref.runtime == "torch" and ref.num_instances == 6

    def no_vmap(fn):
        raise RuntimeError("no batching rule")
    monkeypatch.setattr(torch.func, "vmap", no_vmap)
    with pytest.warns(UserWarning, match="prompts run one by one .*RuntimeError: no batching rule"):   # and why
        r = evaluate([paths["encoder"], paths["decoder"]], ds, runtime=TorchRuntime("cpu", batch_prompts=True),
                     progress=False)
    for k in ("segm_mAP", "AP50", "AP75", "mIoU"):
        assert getattr(r, k) == pytest.approx(getattr(ref, k), abs=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when no CUDA device is visible")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(InputError, match="torch sees no CUDA device"):
        TorchRuntime("cuda")



def test_graphs_run_in_ieee_fp32_and_the_settings_come_back(ds, monkeypatch):
    """TF32 (cuDNN's default for convolutions on GPUs) moves values across 4-bit rounding boundaries, so the
    torch runtime turns it off while it runs a graph, single and vmapped, and restores the caller's settings."""
    from carsam_onnx.torchexec import OnnxModule

    seen = set()
    run = OnnxModule.run

    def spy(self, *args, **kwargs):
        seen.add((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        return run(self, *args, **kwargs)
    monkeypatch.setattr(OnnxModule, "run", spy)
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True   # a caller that wants TF32
    try:
        predictor, preds, _ = _predictions(tiny_sam_paths()["full"], ds, "torch")
        after = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    assert predictor.decoder._vmap_ok is True and len(preds) == 6    # single and vmapped calls both seen
    assert seen == {(False, False)}
    assert after == (True, True)


def test_pipelined_eval_gives_what_predict_gives(ds):
    """run_predictions prepares the next image and finishes the last one in worker threads: the predictions are
    those of set_image + predict image by image, in the same order."""
    from carsam_onnx.deploy.predictor import SamOnnxPredictor

    model = tiny_sam_paths()["full"]
    _, preds, _ = _predictions(model, ds, "ort")
    predictor = SamOnnxPredictor(model, runtime="ort")
    by_image, _, _ = select_prompts(ds, "gt", None)
    expected = []
    for image_id in sorted(by_image):
        out = predictor.set_image(ds.read_image(image_id)).predict(boxes=[p.box_xyxy for p in by_image[image_id]])
        expected += [(image_id, p.ann_id, mask_utils.encode(np.asfortranarray(m.astype(np.uint8))), float(q))
                     for p, m, q in zip(by_image[image_id], out.masks, out.scores)]
    assert [(p.image_id, p.ann_id) for p in preds] == [(e[0], e[1]) for e in expected]
    assert [p.rle["counts"] for p in preds] == [e[2]["counts"] for e in expected]
    assert [p.score for p in preds] == [e[3] for e in expected]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replays_give_the_eager_values(ds):
    """On a GPU each run is captured once and replayed; a batch of 3 prompts is padded to 4. The replayed
    predictions equal the eager ones exactly, and both signatures (single run and vmapped batch) were captured."""
    model = tiny_sam_paths()["full"]
    by_image, _, _ = select_prompts(ds, "gt", None)
    one = {i: by_image[i] for i in sorted(by_image)[:1]}
    one = {i: (v * 2)[:3] for i, v in one.items()}      # three prompts: padded to 4 in the replayed batch
    out = {}
    for graphs in (False, True):
        predictor = build_predictor(model, TorchRuntime("cuda", cuda_graphs=graphs))
        for _ in range(2):   # the first call checks vmap against single runs, the second replays
            out[graphs], _ = run_predictions(predictor, ds, one, progress=False)
    assert predictor.decoder._graphs is not None and len(predictor.decoder._graphs.captured) >= 2
    assert not predictor.decoder._graphs.refused and not predictor.encoder._graphs.refused
    assert [p.rle["counts"] for p in out[True]] == [p.rle["counts"] for p in out[False]]
    assert [p.score for p in out[True]] == [p.score for p in out[False]]


def test_perturbed_draws_start_with_the_evaluation_itself(ds):
    """eval.noise.perturbed_maps: draw 0 is the plain evaluation; with sigma 0 every draw scores the same; each draw
    is reported to `on_draw` in order."""
    from carsam_onnx.eval.noise import perturbed_maps

    model = tiny_sam_paths()["full"]
    plain = evaluate(model, ds, runtime="ort", progress=False).segm_mAP
    seen = []
    maps = perturbed_maps(model, ds, get_runtime("ort"), 3, sigma=0.0, on_draw=lambda k, m: seen.append((k, m)))
    assert maps == [plain] * 3
    assert seen == [(0, plain), (1, plain), (2, plain)]   # each draw reported as it ends
    assert perturbed_maps(model, ds, get_runtime("ort"), 2, sigma=0.5)[0] == plain


def test_image_part_error_is_zero_between_equal_runs_and_sees_a_change(ds, monkeypatch):
    """eval.noise.image_part_error (the float32 check of the GPU parity test): 0 for the same device twice; a
    rounding of the image part's output (TF32-like, 10 mantissa bits) shows as ~1e-4..1e-3."""
    from carsam_onnx.eval.noise import image_part_error
    from carsam_onnx.runtime.torch_runtime import TorchSession

    model, image = tiny_sam_paths()["full"], ds.read_image(ds.image_ids[0])
    assert image_part_error(model, image, ("cpu", "cpu")) == 0.0
    run, calls = TorchSession.run, []

    def coarse_second(self, feeds):   # the second session's outputs keep 10 mantissa bits
        calls.append(1)
        out = run(self, feeds)
        if len(calls) == 2:
            out = {k: (v.view(np.int32) & ~0x1FFF).view(np.float32) for k, v in out.items()}
        return out
    monkeypatch.setattr(TorchSession, "run", coarse_second)
    assert 1e-5 < image_part_error(model, image, ("cpu", "cpu")) < 1e-2
