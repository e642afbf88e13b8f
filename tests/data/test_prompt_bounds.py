"""Command-line prompts against the image they are for: finite, inside (within the tolerance), boxes clipped."""
from __future__ import annotations

import numpy as np
import pytest

from carsam_onnx.data.coco import BOX_TOLERANCE_PX
from carsam_onnx.data.preprocess import Geometry
from carsam_onnx.data.prompts import check_prompts_inside
from carsam_onnx.deploy.predictor import encode_prompts
from carsam_onnx.errors import InputError


def test_inside_prompts_pass_and_boxes_within_the_tolerance_are_clipped():
    t = BOX_TOLERANCE_PX / 2
    boxes = check_prompts_inside([[-t, 0, 50, 40 + t]], [[0, 0], [100 + t, 40]], 40, 100, "image a.png")
    assert boxes == [(0.0, 0.0, 50.0, 40.0)]
    assert check_prompts_inside(None, [[3, 4]], 40, 100, "x") is None


def test_numpy_prompts_of_the_library_api_are_accepted():
    assert check_prompts_inside(np.array([1.0, 2, 30, 20]), np.array([[[5.0, 5]]]), 40, 100, "x") == [(1, 2, 30, 20)]


@pytest.mark.parametrize("boxes, points, words", [
    ([[0, 0, 100 + 2 * BOX_TOLERANCE_PX, 40]], None,
     "box [0.0, 0.0, 102.0, 40.0] (x0, y0, x1, y1) lies outside image a.png (100 x 40)"),
    (None, [[3, 3], [-5, 3]], "point (-5.0, 3.0) lies outside image a.png (100 x 40)"),
    ([[0, 0, float("nan"), 4]], None, "box [0.0, 0.0, nan, 4.0]: coordinates must be finite"),
    (None, [[float("inf"), 1]], "point [inf, 1.0]: coordinates must be finite"),
])
def test_outside_or_non_finite_prompts_are_refused(boxes, points, words):
    with pytest.raises(InputError) as e:
        check_prompts_inside(boxes, points, 40, 100, "image a.png")
    assert str(e.value).startswith(words)


def test_prompts_of_the_wrong_shape_are_left_to_encode_prompts():
    assert check_prompts_inside([[1, 2, 3]], None, 40, 100, "x") == [[1, 2, 3]]
    with pytest.raises(InputError, match=r"boxes must be \[k, 4\]"):
        encode_prompts(Geometry.of(40, 100, 64), boxes=[[1, 2, 3]])


@pytest.mark.parametrize("kw", [{"boxes": [[0, 0, float("nan"), 3]]}, {"points": [[float("-inf"), 2]]}])
def test_encode_prompts_refuses_non_finite_coordinates(kw):
    with pytest.raises(InputError, match="finite"):
        encode_prompts(Geometry.of(40, 100, 64), **kw)
