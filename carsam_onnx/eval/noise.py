"""The float-rounding noise of an evaluation: segm mAP over draws that add N(0, sigma) to the normalised image.

At 4-bit activations a value within float rounding of a rounding tie lands on one code or the next depending on
the arithmetic's order, and the flipped code (a whole quantization step) spreads through the later layers, so
two correct runtimes, or one runtime on an input changed far below one grey level, score differently
(docs/results.md, "CUDA parity at W4A4"). Draw 0 is the image as is; draw k > 0 adds noise from seed k.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..data.coco import CocoDataset
from ..deploy.engines import build_predictor
from ..runtime import Runtime
from .metrics import segm_metrics
from .runner import run_predictions, select_prompts

SIGMA = 1e-4   # std added to the normalised image: about 1/170 of one grey level (1/58 there)


def perturbed_maps(model, dataset: CocoDataset, runtime: Runtime, draws: int, sigma: float = SIGMA,
                   limit: int | None = None, on_draw: Callable[[int, float], None] | None = None) -> list[float]:
    """segm mAP (ground-truth boxes) of `draws` evaluations of `model` on `runtime`: the first unperturbed, the
    others with N(0, sigma) added to the preprocessed image. `on_draw(k, mAP)` is called as each draw ends."""
    by_image, ids, _ = select_prompts(dataset, "gt", limit)
    engine = build_predictor(model, runtime)
    encode, maps = engine.set_image, []
    for k in range(draws):
        def perturbed(image, geometry, rng=np.random.default_rng(k)):
            return encode((image + rng.normal(0, sigma, image.shape)).astype(np.float32), geometry)
        engine.set_image = encode if k == 0 else perturbed
        preds, _ = run_predictions(engine, dataset, by_image, progress=False)
        maps.append(segm_metrics(dataset, preds, ids)["segm_mAP"])
        if on_draw is not None:
            on_draw(k, maps[-1])
    return maps


def image_part_error(model, image: np.ndarray, devices: tuple[str, str] = ("cpu", "cuda")) -> float:
    """Relative L2 distance between the image part's output of `model` (an FP model: no codes to flip) on two
    torch devices, for one uint8 image: about 1e-6 in IEEE float32, about 1e-3 where TF32 is on."""
    from ..data.preprocess import preprocess_image
    from ..runtime.torch_runtime import TorchRuntime

    outs = []
    for device in devices:
        engine = build_predictor(model, TorchRuntime(device))
        tensor, _ = preprocess_image(image, engine.image_size)
        outs.append(next(iter(engine.encoder.run({"image": tensor}).values())))
    return float(np.linalg.norm(outs[1] - outs[0]) / np.linalg.norm(outs[0]))
