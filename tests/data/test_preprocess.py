"""SamPredictor-style preprocessing matches segment-anything's own transforms numerically."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything.utils.transforms import ResizeLongestSide

from carsam_onnx.data.preprocess import (Geometry, postprocess_masks, preprocess_image, resized_shape,
                                         to_rgb_uint8, transform_boxes, transform_coords, upscale_logits)
from carsam_onnx.export.models import SamArch, build_sam_arch

SIZES = [(480, 640), (640, 480), (333, 1000), (1000, 333), (517, 517), (1, 7), (1500, 2250)]


@pytest.fixture(scope="module")
def tiny_sam():
    torch.manual_seed(0)
    return build_sam_arch(SamArch(32, 1, 1, (0,), image_size=256, window_size=4))


@pytest.mark.parametrize("hw", SIZES)
def test_resized_shape_matches_resize_longest_side(hw):
    for s in (256, 1024):
        assert resized_shape(*hw, s) == ResizeLongestSide.get_preprocess_shape(*hw, s)


@pytest.mark.parametrize("hw", [(120, 200), (200, 120), (97, 97)])
def test_preprocess_image_matches_sam_predictor(tiny_sam, hw):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
    ours, geo = preprocess_image(image, 256)
    # SamPredictor.set_image: ResizeLongestSide.apply_image, HWC -> BCHW, Sam.preprocess (normalise + pad)
    resized = ResizeLongestSide(256).apply_image(image)
    ref = tiny_sam.preprocess(torch.as_tensor(resized).permute(2, 0, 1)[None].float()).numpy()
    assert ours.shape == ref.shape == (1, 3, 256, 256) and ours.dtype == np.float32
    assert geo.resized_hw == resized.shape[:2] and geo.original_hw == hw
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    # the padding is zero after normalisation, as Sam.preprocess pads
    h, w = geo.resized_hw
    assert not ours[..., h:, :].any() and not ours[..., :, w:].any()


@pytest.mark.parametrize("hw", [(120, 200), (200, 120), (97, 97)])
def test_preprocess_image_is_the_float32_formula_bit_for_bit(hw):
    """Per-plane in-place normalisation (fast) gives exactly the bytes of (x - mean) / std on the HxWx3 float32
    image: every score measured before the change stays valid."""
    from carsam_onnx.data.preprocess import PIXEL_MEAN, PIXEL_STD, resize_image

    image = np.random.default_rng(2).integers(0, 256, (*hw, 3), dtype=np.uint8)
    ours, geo = preprocess_image(image, 256)
    ref = np.zeros_like(ours)
    h, w = geo.resized_hw
    ref[0, :, :h, :w] = ((resize_image(image, 256).astype(np.float32) - PIXEL_MEAN) / PIXEL_STD).transpose(2, 0, 1)
    assert ours.tobytes() == ref.tobytes()


def test_gray_and_rgba_become_rgb():
    g = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert to_rgb_uint8(g).shape == (3, 4, 3) and (to_rgb_uint8(g)[..., 2] == g).all()
    rgba = np.zeros((3, 4, 4), np.uint8)
    assert to_rgb_uint8(rgba).shape == (3, 4, 3)
    with pytest.raises(ValueError):
        to_rgb_uint8(np.zeros((3, 4, 2), np.uint8))


@pytest.mark.parametrize("hw", SIZES)
def test_coordinates_match_resize_longest_side(hw):
    rng = np.random.default_rng(2)
    t = ResizeLongestSide(1024)
    pts = rng.uniform(0, 1, (5, 2)) * np.array([hw[1], hw[0]])
    geo = Geometry.of(*hw, 1024)
    np.testing.assert_allclose(transform_coords(pts, geo), t.apply_coords(pts, hw), rtol=1e-6, atol=1e-4)
    boxes = np.concatenate([pts[:, :2] * 0.5, pts[:, :2]], 1)
    np.testing.assert_allclose(transform_boxes(boxes, geo), t.apply_boxes(boxes, hw), rtol=1e-6, atol=1e-4)
    assert transform_coords(pts, geo).dtype == np.float32


@pytest.mark.parametrize("hw", [(480, 640), (640, 481), (100, 100), (37, 250)])
def test_postprocess_matches_sam_postprocess_masks(tiny_sam, hw):
    rng = np.random.default_rng(3)
    low = rng.standard_normal((3, 1, 64, 64)).astype(np.float32) * 4
    geo = Geometry.of(*hw, 256)
    ref = tiny_sam.postprocess_masks(torch.as_tensor(low), geo.resized_hw, hw)[:, 0]
    ours = upscale_logits(low, geo)
    assert ours.shape == (3, *hw)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    masks = postprocess_masks(low[:, 0], geo)  # [k, s, s] form is accepted as well
    assert masks.dtype == bool and (masks == (ref > 0).numpy()).all()


def test_postprocess_rejects_bad_shape():
    with pytest.raises(ValueError, match="low-res masks"):
        upscale_logits(np.zeros((2, 3, 8, 8), np.float32), Geometry.of(10, 10, 32))
