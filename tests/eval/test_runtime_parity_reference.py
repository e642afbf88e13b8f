"""ORT and the torch runtime give the same COCO metrics on synthetic images with the trained reference model,
FP and quantized by `carsam-onnx quantize` (eval's --runtime torch must be a faithful stand-in for ORT).

FP graphs agree exactly. Q/DQ graphs compute the same thing in two float implementations, so an activation
lying within ~1e-6 of a rounding boundary can land on neighbouring integer codes in the two runtimes; at 4-bit
activations one such flip early in the encoder can move an image's logits by several units (measured: 2 of 12
images differ, the other masks agree to 2e-5). With 12 images (63 instances, one instance crossing one IoU
threshold = 0.16 mAP) the thresholds below allow those flips but not a semantic difference, which would move
every image. The 200-image comparison is in docs/results.md."""
from __future__ import annotations

import warnings

import pytest

from carsam_onnx import api
from carsam_onnx.config import BitWidths, QuantConfig
from carsam_onnx.data.builtin import VALIDATION_SEED
from carsam_onnx.data.synth import write_synthetic_coco
from carsam_onnx.export.models import REFERENCE_WEIGHTS

MAX_GAP = {None: (0.2, 0.001), "w8a8": (0.5, 0.003), "w4a4": (2.0, 0.02)}   # (mAP, mIoU)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    if not REFERENCE_WEIGHTS.is_file():
        pytest.skip("bundled reference weights are missing")
    from sam_models import reference_onnx_path

    tmp = tmp_path_factory.mktemp("ref")
    fp = reference_onnx_path("full")   # what `carsam-onnx export --model-type reference` writes; cached, shared
    val = tmp / "val"
    write_synthetic_coco(val, 12, VALIDATION_SEED)
    return tmp, fp, val


@pytest.mark.slow
@pytest.mark.parametrize("bits,method", [(None, None), ("w4a4", "percentile")])   # W8A8: test_runtime_parity_qdq
def test_ort_and_torch_runtimes_agree(reference, bits, method):
    tmp, fp, val = reference
    model = fp
    if bits:
        model = tmp / f"{bits}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            api.quantize(fp, model, QuantConfig(bits=BitWidths.parse(bits), method=method, num_calib=8),
                         force=True, progress=False)
    ort_r = api.evaluate(model, dataset=val, runtime="ort", progress=False)
    torch_r = api.evaluate(model, dataset=val, runtime="torch", device="cpu", progress=False)
    assert ort_r.num_instances == torch_r.num_instances > 30
    max_map, max_miou = MAX_GAP[bits]
    assert abs(ort_r.segm_mAP - torch_r.segm_mAP) <= max_map, (ort_r.summary(), torch_r.summary())
    assert abs(ort_r.mIoU - torch_r.mIoU) <= max_miou, (ort_r.summary(), torch_r.summary())
    if bits is None:
        assert ort_r.segm_mAP > 50     # the trained model segments this data (80.1 mAP on 200 images)


@pytest.mark.slow
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.xfail(reason="not met yet: ORT 73.98 against torch CUDA 74.63 on an H200, TF32 off (docs/results.md, "
                          "sixth GPU round)", strict=False)
def test_torch_runtime_on_cuda_scores_as_ort_at_w4a4(tmp_path):
    """Issue 11's promise for `eval --runtime torch --device cuda`: within 0.2 mAP of ONNX Runtime on 80 images of
    a validation seed, W4A4 MSE model (measured 0.45 apart before the graphs ran in IEEE float32, TF32 off)."""
    if not REFERENCE_WEIGHTS.is_file():
        pytest.skip("bundled reference weights are missing")
    from sam_models import reference_onnx_path

    fp, val, model = reference_onnx_path("full"), tmp_path / "val", tmp_path / "w4a4.onnx"
    write_synthetic_coco(val, 80, 7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        api.quantize(fp, model, QuantConfig(bits=BitWidths.parse("w4a4"), method="mse", num_calib=32),
                     force=True, progress=False)
    ort_r = api.evaluate(model, dataset=val, runtime="ort", progress=False)
    cuda_r = api.evaluate(model, dataset=val, runtime="torch", device="cuda", progress=False)
    print(f"W4A4 MSE, 80 images of validation seed 7: ORT {ort_r.segm_mAP:.2f}, torch CUDA {cuda_r.segm_mAP:.2f}")
    assert ort_r.num_instances == cuda_r.num_instances > 200
    assert abs(ort_r.segm_mAP - cuda_r.segm_mAP) <= 0.2, (ort_r.summary(), cuda_r.summary())
