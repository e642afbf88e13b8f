"""passes/smooth.py: a normalisation -> weight-layer pair is found where rewriting it is exact, and nowhere else."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper
from onnx_graphs import float_input, make_model
from sam_models import reference_onnx_path
from tiny_sam import tiny_sam_paths

from carsam_onnx.config import BitWidths, QuantConfig
from carsam_onnx.passes.plan import plan_quantization
from carsam_onnx.passes.smooth import find_smooth_pairs

C = 8


def _pairs(model, keep_float=()):
    return find_smooth_pairs(model, plan_quantization(model, QuantConfig(bits=BitWidths(4, 4), keep_float=keep_float)))


def _norm_graph(after: str):
    """x [2, 4, C] -> LayerNormalization -> (after) -> MatMul W [C, 6]; `after` names what else happens."""
    rng = np.random.default_rng(0)
    inits = {"g": rng.random(C).astype(np.float32) + 0.5, "b": rng.standard_normal(C).astype(np.float32),
             "W": rng.standard_normal((C, 6)).astype(np.float32), "W2": rng.standard_normal((C, 6)).astype(np.float32),
             "shape": np.array([8, C], dtype=np.int64), "shape_bad": np.array([2, 4 * C], dtype=np.int64)}
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["n"], name="norm", axis=-1)]
    into, outputs = "n", ["y"]
    if after == "reshape":
        nodes.append(helper.make_node("Reshape", ["n", "shape"], ["r"], name="reshape"))
        into = "r"
    elif after == "reshape_channels":                          # merges the channel axis with another: not exact
        nodes.append(helper.make_node("Reshape", ["n", "shape_bad"], ["r"], name="reshape"))
        into = "r"
    elif after == "transpose_channels":                        # moves the channel axis
        nodes.append(helper.make_node("Transpose", ["n"], ["r"], name="transpose", perm=[0, 2, 1]))
        into = "r"
    nodes.append(helper.make_node("MatMul", [into, "W"], ["y"], name="mm"))
    if after == "residual":                                    # the normalised value is also the next residual
        nodes.append(helper.make_node("Add", ["n", "x"], ["res"], name="res"))
        outputs.append("res")
    if after == "shared_gamma":                                # gamma read by a second node
        nodes.append(helper.make_node("Mul", ["x", "g"], ["gx"], name="gx"))
        outputs.append("gx")
    if after == "shared_weight":                               # W read by a second node
        nodes.append(helper.make_node("MatMul", ["x", "W"], ["xw"], name="xw"))
        outputs.append("xw")
    if after == "two_layers":
        nodes.append(helper.make_node("MatMul", ["n", "W2"], ["y2"], name="mm2"))
        outputs.append("y2")
    shapes = {"y": [2, 4, 6], "res": [2, 4, C], "gx": [2, 4, C], "y2": [2, 4, 6], "xw": [2, 4, 6]}
    if after in ("reshape", "reshape_channels"):
        shapes["y"] = None
    if after == "transpose_channels":
        inits["W"] = np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32)
    model = make_model(nodes, [float_input("x", [2, 4, C])], [float_input(o, shapes[o]) for o in outputs],
                       inits)
    return onnx.shape_inference.infer_shapes(model)


@pytest.mark.parametrize("after,weights", [("none", ["W"]), ("reshape", ["W"]), ("two_layers", ["W", "W2"])])
def test_norm_feeding_only_weight_layers_is_a_pair(after, weights):
    pairs = _pairs(_norm_graph(after))
    assert len(pairs) == 1
    p = pairs[0]
    assert (p.gamma, p.beta, p.channels, p.channel_axis) == ("g", "b", C, -1)
    assert sorted(w for w, _ in p.weights) == weights and all(axis == 0 for _, axis in p.weights)
    assert p.value == ("r" if after == "reshape" else "n")


@pytest.mark.parametrize("after", ["residual", "shared_gamma", "shared_weight", "reshape_channels",
                                   "transpose_channels"])
def test_no_pair_where_the_rewrite_would_change_the_model(after):
    assert _pairs(_norm_graph(after)) == []


def test_no_pair_when_the_weight_layer_stays_float():
    model = _norm_graph("none")
    assert _pairs(model, keep_float=("mm",)) == []


def test_reference_sam_pairs_are_the_encoder_norms_and_the_neck():
    path = reference_onnx_path()
    model = onnx.load(str(path))
    plan = plan_quantization(model, QuantConfig(bits=BitWidths(4, 4)))
    pairs = find_smooth_pairs(model, plan)
    quantized = {a.value for a in plan.activations}
    gammas = [p.gamma for p in pairs]
    blocks = 12
    assert len(pairs) == 2 * blocks + 1
    assert sum(".norm1." in g for g in gammas) == blocks and sum(".norm2." in g for g in gammas) == blocks
    assert not any("mask_decoder" in g for g in gammas)           # the decoder's norms feed the residual stream
    neck = [p for p in pairs if p.channel_axis == 1]
    assert len(neck) == 1 and neck[0].weights == (("image_encoder.neck.2.weight", 1),)
    assert all(p.value in quantized for p in pairs)
    windowed = [p for p in pairs if ".norm1." in p.gamma and p.value.startswith("view")]
    assert windowed                                               # through the window partition's re-layout
    assert find_smooth_pairs(model, plan_quantization(model, QuantConfig(bits=BitWidths(4, 16)))) == []


def test_no_pair_on_initializers_an_exporter_shares():
    """A random-init export deduplicates equal LayerNorm weights (all ones): rewriting one would rewrite all."""
    model = onnx.load(str(tiny_sam_paths()["full"]))
    assert find_smooth_pairs(model, plan_quantization(model, QuantConfig(bits=BitWidths(4, 4)))) == []
