"""passes/quant_points.insert_quant_points: one Identity per activation site, read by the site's listed consumers
only; everything else reads the value as before, and the copy computes what the model computes."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import helper

from carsam_onnx.passes.quant_points import insert_quant_points
from carsam_onnx.passes.sites import ActivationKind, ActivationSite, QuantPlan
from onnx_graphs import float_input, make_model


def _residual_block(extra_nodes=()):
    """y = x + x @ W (the MatMul quantizes x, the residual Add keeps it float), plus `extra_nodes`."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("Add", ["x", "h"], ["y"], name="add"), *extra_nodes]
    outputs = [float_input("y", [2, 4])] + [float_input(n.output[0], [2, 4]) for n in extra_nodes]
    return make_model(nodes, [float_input("x", [2, 4])], outputs, {"W": rng.standard_normal((4, 4), np.float32)})


def _plan(*sites):
    return QuantPlan(weights=(), activations=tuple(ActivationSite(v, c, ActivationKind.LAYER_INPUT) for v, c in sites),
                     attention=())


def _run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def test_listed_consumers_read_the_quant_point_others_the_value():
    model = _residual_block()
    out, qpoint = insert_quant_points(model, _plan(("x", ("mm",))))
    assert qpoint == {"x": "x__carsam_recon_q"}
    nodes = {n.name: n for n in out.graph.node}
    assert list(nodes["mm"].input) == ["x__carsam_recon_q", "W"]           # the quantized consumer
    assert list(nodes["add"].input) == ["x", "h"]                          # the residual keeps the float value
    ident = nodes["x__carsam_recon_q"]
    assert ident.op_type == "Identity" and list(ident.input) == ["x"]
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_array_equal(_run(out, x)[0], _run(model, x)[0])
    assert len(model.graph.node) == 2                                      # the input model is not modified
    # a site on a value a node produces; the quant points come after the model's nodes (the order the figures
    # were made in: QDrop draws its masks in execution order), which ONNX Runtime and the executor accept
    out, qpoint = insert_quant_points(model, _plan(("x", ("mm",)), ("h", ("add",))))
    assert [n.name for n in out.graph.node] == ["mm", "add", "x__carsam_recon_q", "h__carsam_recon_q"]
    assert list({n.name: n for n in out.graph.node}["add"].input) == ["x", "h__carsam_recon_q"]
    np.testing.assert_array_equal(_run(out, x)[0], _run(model, x)[0])


def test_taken_names_and_values_outside_the_plan_are_left_alone():
    taken = helper.make_node("Relu", ["x"], ["x__carsam_recon_q"], name="taken")   # the name is taken already
    model = _residual_block([taken])
    out, qpoint = insert_quant_points(model, _plan(("x", ("mm",))))
    assert qpoint["x"] != "x__carsam_recon_q" and qpoint["x"].startswith("x__carsam_recon_q")
    nodes = {n.name: n for n in out.graph.node}
    assert list(nodes["taken"].input) == ["x"] and list(nodes["add"].input) == ["x", "h"]
    assert list(nodes["mm"].input) == [qpoint["x"], "W"]
    out2, q2 = insert_quant_points(model, _plan())                        # no activation sites: no quant points
    assert q2 == {} and [n.name for n in out2.graph.node] == ["mm", "add", "taken"]
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_array_equal(_run(out, x)[1], _run(model, x)[1])     # the Relu reads the float x
