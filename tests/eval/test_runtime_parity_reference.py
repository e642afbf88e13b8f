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
from carsam_onnx.runtime import get_runtime as api_runtime

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


@pytest.fixture(scope="module")
def w4a4_mse_80(tmp_path_factory):
    """The W4A4 MSE reference model and 80 images of validation seed 7 (issue 11's CUDA parity setting)."""
    if not REFERENCE_WEIGHTS.is_file():
        pytest.skip("bundled reference weights are missing")
    from sam_models import reference_onnx_path

    tmp = tmp_path_factory.mktemp("cuda_parity")
    fp, val, model = reference_onnx_path("full"), tmp / "val", tmp / "w4a4.onnx"
    write_synthetic_coco(val, 80, 7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        api.quantize(fp, model, QuantConfig(bits=BitWidths.parse("w4a4"), method="mse", num_calib=32),
                     force=True, progress=False)
    return fp, val, model


CUDA = pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.slow
@CUDA
@pytest.mark.xfail(reason="not met, and not meetable by a runtime that is not bit-identical to ORT: at W4A4 float "
                          "rounding alone moves one 80-image evaluation by 0.26-0.40 mAP (std over invisible input "
                          "perturbations, H200); measured ORT 73.98 against torch CUDA 74.70 (docs/results.md, "
                          "'CUDA parity at W4A4')", strict=False)
def test_torch_runtime_on_cuda_scores_as_ort_at_w4a4(w4a4_mse_80):
    """Issue 11's promise as written: within 0.2 mAP of ONNX Runtime on 80 images of a validation seed, one
    evaluation each, W4A4 MSE model."""
    _, val, model = w4a4_mse_80
    ort_r = api.evaluate(model, dataset=val, runtime="ort", progress=False)
    cuda_r = api.evaluate(model, dataset=val, runtime="torch", device="cuda", progress=False)
    print(f"W4A4 MSE, 80 images of validation seed 7: ORT {ort_r.segm_mAP:.2f}, torch CUDA {cuda_r.segm_mAP:.2f}")
    assert ort_r.num_instances == cuda_r.num_instances > 200
    assert abs(ort_r.segm_mAP - cuda_r.segm_mAP) <= 0.2, (ort_r.summary(), cuda_r.summary())


@pytest.mark.slow
@CUDA
def test_torch_runtime_on_cuda_scores_as_ort_within_the_noise(w4a4_mse_80):
    """What can be promised at W4A4: the torch runtime on CUDA computes in IEEE float32 (the FP image part within
    1e-5 of the CPU's; TF32 gives ~1e-3) and scores as ORT up to float-rounding noise. Each runtime is evaluated
    5 times, the image as is and 4 times with an invisible perturbation; the means agree within 0.6 mAP, about 3
    standard errors of their difference (H200: ORT 73.72 +- 0.26, torch CUDA 74.04 +- 0.40 over 5 draws)."""
    import numpy as np

    from carsam_onnx.data.coco import load_coco_dataset
    from carsam_onnx.eval.noise import image_part_error, perturbed_maps
    from carsam_onnx.runtime.torch_runtime import TorchRuntime

    fp, val, model = w4a4_mse_80
    ds = load_coco_dataset(val)
    assert image_part_error(fp, ds.read_image(ds.image_ids[0]), ("cpu", "cuda")) < 1e-5
    ort_maps = perturbed_maps(model, ds, api_runtime("ort"), 5)
    cuda_maps = perturbed_maps(model, ds, TorchRuntime("cuda"), 5)
    print(f"ORT {np.mean(ort_maps):.2f} +- {np.std(ort_maps, ddof=1):.2f}, "
          f"torch CUDA {np.mean(cuda_maps):.2f} +- {np.std(cuda_maps, ddof=1):.2f}")
    assert abs(np.mean(ort_maps) - np.mean(cuda_maps)) <= 0.6, (ort_maps, cuda_maps)
