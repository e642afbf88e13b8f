"""check_trt: static TensorRT Q/DQ rules. Each rule fires on a graph that breaks it and stays silent on a
look-alike that follows it."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from carsam_onnx.artifact import CalibrationArtifact
from carsam_onnx import qmath
from carsam_onnx.passes.emit import emit_qdq, int_tensor
from carsam_onnx.passes.sites import ActivationKind, ActivationSite, QuantPlan, WeightKind, WeightSite
from carsam_onnx.passes.trt_rules import CHECKS, ERROR, RULES, WARNING, check_trt, errors, format_report

RNG = np.random.default_rng(1)


def _f(name, value):
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def build(*, act_type=TensorProto.INT8, act_zp=0, act_scale=0.05, act_scale_shape=(), act_block=0,
          w_type=TensorProto.INT8, w_shape=(64, 32), w_axis=1, w_scale_shape=None, w_block=0, layer="MatMul",
          gemm_transB=0, quantize_act=True, clip=False, q_extra_reader=False, q_as_output=False,
          w_between=None, zp_from_input=False, scale_from_input=False):
    """x -> [Clip] -> Q -> DQ -> layer(., DQ(W)) -> y, every knob breaking one TensorRT rule."""
    k = w_shape[0] if layer == "MatMul" else (w_shape[1] if gemm_transB or layer == "Conv" else w_shape[0])
    xshape = [1, k, 4, 4] if layer == "Conv" else [4, k]
    inits, nodes, inputs, outputs = [], [], [helper.make_tensor_value_info("x", TensorProto.FLOAT, xshape)], []
    data = "x"
    if quantize_act:
        if clip:
            inits += [_f("lo", -1.0), _f("hi", 1.0)]
            nodes.append(helper.make_node("Clip", ["x", "lo", "hi"], ["xc"], name="clip"))
            data = "xc"
        if scale_from_input:
            inputs.append(helper.make_tensor_value_info("s_in", TensorProto.FLOAT, []))
            sname = "s_in"
        else:
            sname = "x_scale"
            inits.append(_f("x_scale", np.full(act_scale_shape, act_scale) if act_scale_shape or act_block else act_scale))
        zshape = np.zeros(act_scale_shape, np.int64) if (act_scale_shape or act_block) else np.array(act_zp)
        if act_scale_shape and act_zp:
            zshape = zshape + act_zp
        if zp_from_input:
            inputs.append(helper.make_tensor_value_info("z_in", act_type, []))
            zname = "z_in"
        else:
            zname = "x_zp"
            inits.append(int_tensor("x_zp", zshape, act_type))
        qattrs = {"block_size": act_block, "axis": 0} if act_block else ({"axis": 1} if act_scale_shape else {})
        nodes.append(helper.make_node("QuantizeLinear", [data, sname, zname], ["x_q"], name="q", **qattrs))
        nodes.append(helper.make_node("DequantizeLinear", ["x_q", sname, zname], ["x_dq"], name="dq", **qattrs))
        if q_extra_reader:
            nodes.append(helper.make_node("Cast", ["x_q"], ["x_q_f"], name="reader", to=TensorProto.FLOAT))
            outputs.append(onnx.ValueInfoProto(name="x_q_f"))
        if q_as_output:
            outputs.append(onnx.ValueInfoProto(name="x_q"))
        data = "x_dq"
    lo, hi = (-8, 7) if w_type == TensorProto.INT4 else (-127, 127)
    inits.append(int_tensor("W_q", RNG.integers(lo, hi + 1, size=w_shape), w_type))
    if w_scale_shape is None:
        w_scale_shape = (w_shape[w_axis],)
    inits.append(_f("W_s", RNG.uniform(0.01, 0.02, size=w_scale_shape)))
    wattrs = {"axis": w_axis, **({"block_size": w_block} if w_block else {})}
    nodes.append(helper.make_node("DequantizeLinear", ["W_q", "W_s"], ["W_dq"], name="w_dq", **wattrs))
    w_in = "W_dq"
    if w_between:
        nodes.append(helper.make_node(w_between, ["W_dq"], ["W_t"], name="between"))
        w_in = "W_t"
    attrs = {"transB": gemm_transB} if layer == "Gemm" else {}
    nodes.append(helper.make_node(layer, [data, w_in], ["y"], name="layer", **attrs))
    outputs.append(onnx.ValueInfoProto(name="y"))
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    return onnx.shape_inference.infer_shapes(model)         # types the outputs declared without a shape


def rules_of(model):
    return sorted({v.rule for v in check_trt(model)})


# ------------------------------------------------------------------------------------ clean look-alikes

CLEAN = {
    "int8 matmul": {},
    "int8 gemm transB": dict(layer="Gemm", gemm_transB=1, w_shape=(32, 64), w_axis=0),
    "int8 gemm": dict(layer="Gemm", w_shape=(64, 32), w_axis=1),
    "int8 conv": dict(layer="Conv", w_shape=(16, 64, 1, 1), w_axis=0),
    "int4 weight-only blocked": dict(quantize_act=False, w_type=TensorProto.INT4, w_axis=0, w_block=16,
                                     w_scale_shape=(4, 32)),
    "int4 weight-only per-channel": dict(quantize_act=False, w_type=TensorProto.INT4),
    "per-tensor weight": dict(w_scale_shape=()),
}


@pytest.mark.parametrize("name", sorted(CLEAN))
def test_trt_conform_graphs_have_no_violations(name):
    model = build(**CLEAN[name])
    onnx.checker.check_model(model, full_check=True)
    assert check_trt(model) == [], format_report(check_trt(model))


# -------------------------------------------------------------------------------------- one per rule

BROKEN = [  # (rule, knobs)
    ("quantized-type", dict(act_type=TensorProto.UINT8)),
    ("quantized-type", dict(act_type=TensorProto.UINT4)),
    ("zero-point", dict(act_zp=3)),
    ("zero-point", dict(zp_from_input=True)),
    ("scale", dict(act_scale=0.0)),
    ("scale", dict(act_scale=float("inf"))),
    ("scale", dict(scale_from_input=True)),
    ("activation-per-tensor", dict(act_scale_shape=(64,))),
    ("int4-weight-only", dict(act_type=TensorProto.INT4)),
    ("int4-weight-only-layer", dict(w_type=TensorProto.INT4)),
    ("int4-even-last-dim", dict(quantize_act=False, w_type=TensorProto.INT4, w_shape=(64, 31))),
    ("per-channel-size", dict(w_scale_shape=(31,))),
    ("weight-channel-axis", dict(w_axis=0)),
    ("weight-channel-axis", dict(layer="Gemm", gemm_transB=1, w_shape=(32, 64), w_axis=1)),
    ("weight-channel-axis", dict(layer="Conv", w_shape=(16, 64, 1, 1), w_axis=1)),
    ("block-weight-only", dict(act_block=16, act_scale_shape=(1, 64))),
    ("block-shape", dict(quantize_act=False, w_type=TensorProto.INT4, layer="Conv", w_shape=(16, 64, 1, 2),
                         w_axis=1, w_block=16, w_scale_shape=(16, 4, 1, 2))),
    ("block-shape", dict(quantize_act=False, w_type=TensorProto.INT4, w_shape=(40, 32), w_axis=0, w_block=16,
                         w_scale_shape=(3, 32))),
    ("block-type", dict(quantize_act=False, w_axis=0, w_block=16, w_scale_shape=(4, 32))),
    ("q-dq-pair", dict(q_extra_reader=True)),
    ("q-dq-pair", dict(q_as_output=True)),
    ("weight-dq-placement", dict(w_between="Identity")),
    ("narrow-grid-clip", dict(clip=True)),
]


@pytest.mark.parametrize("rule,knobs", BROKEN, ids=[f"{r}-{i}" for i, (r, _) in enumerate(BROKEN)])
def test_each_rule_fires_on_the_graph_that_breaks_it(rule, knobs):
    model = build(**knobs)
    found = check_trt(model)
    assert rule in {v.rule for v in found}, format_report(found)
    v = next(v for v in found if v.rule == rule)
    assert v.severity == RULES[rule][0] and v.node and "\n" not in v.message
    # the break is local: nothing unrelated fires on top (rules that a knob implies are listed here)
    implied = {"act_scale_shape": {"activation-per-tensor"}, "act_block": {"block-weight-only", "activation-per-tensor"},
               "w_type": {"int4-weight-only-layer"}, "act_type": {"int4-weight-only-layer"}}
    allowed = {rule}.union(*(implied.get(k, set()) for k in knobs))
    assert {x.rule for x in found} <= allowed, format_report(found)


def test_every_rule_is_exercised():
    assert {r for r, _ in BROKEN} == set(RULES)
    assert {sev for sev, _ in RULES.values()} == {ERROR, WARNING}


def test_one_check_function_per_rule():
    """check_trt runs CHECKS; each function is named after the one rule it reports."""
    assert sorted(c.__name__.removeprefix("rule_").replace("_", "-") for c in CHECKS) == sorted(RULES)


# ------------------------------------------------------------------------------------ emitted graphs

def _emitted(bits_w, bits_a, symmetric, containers=None, block=None):
    W = RNG.normal(size=(64, 32)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 32])],
                          [numpy_helper.from_array(W, "W")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    acts = (ActivationSite("x", ("mm",), ActivationKind.LAYER_INPUT),) if bits_a < 16 else ()
    plan = QuantPlan((WeightSite("mm", "W", 1, WeightKind.LINEAR),), acts, ())
    art = CalibrationArtifact(
        activations={"x": qmath.activation_quant_from_range(-2.0, 3.0, bits_a, symmetric)} if bits_a < 16 else {},
        weights={"W": qmath.weight_quant_from_minmax(W, 1, bits_w, block)})
    return emit_qdq(model, plan, art, float_activations=bits_a == 16,
                    weight_container_bits=containers, activation_container_bits=containers)


def test_emitted_trt_target_graphs_are_clean():
    assert errors(check_trt(_emitted(8, 8, True))) == []
    assert check_trt(_emitted(4, 16, True, block=16)) == []                         # INT4 weight-only, blocked
    assert rules_of(_emitted(4, 4, True, containers=8)) == ["narrow-grid-clip"]     # 4-bit grids inside INT8


def test_emitted_ort_target_graphs_are_flagged():
    assert "quantized-type" in rules_of(_emitted(8, 8, False))                       # UINT8 asymmetric activations
    assert {"int4-weight-only", "int4-weight-only-layer"} <= set(rules_of(_emitted(4, 4, True)))


def test_vit_b_decoder_w8a8_symmetric_is_trt_clean():
    from sam_models import sam_onnx_path
    sys.path.insert(0, str(Path(__file__).resolve().parent))      # helpers shared with test_emit_qdq.py
    from test_emit_qdq import _decoder_feed, _ranges, _weight_layer_plan

    model = onnx.load(str(sam_onnx_path("vit_b", "decoder", "dynamo")))
    plan = _weight_layer_plan(model)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    ranges = _ranges(model, [s.value for s in plan.activations], _decoder_feed())
    art = CalibrationArtifact(
        activations={v: qmath.activation_quant_from_range(lo, hi, 8, True) for v, (lo, hi) in ranges.items()},
        weights={s.initializer: qmath.weight_quant_from_minmax(inits[s.initializer], s.axis, 8) for s in plan.weights})
    found = check_trt(emit_qdq(model, plan, art))
    assert errors(found) == [], format_report(found)
    asym = CalibrationArtifact(
        activations={v: qmath.activation_quant_from_range(lo, hi, 8, False) for v, (lo, hi) in ranges.items()},
        weights=art.weights)
    flagged = check_trt(emit_qdq(model, plan, asym))
    assert sum(v.rule == "quantized-type" for v in flagged) == 2 * len(plan.activations)   # each Q and DQ


def test_report_format():
    assert "no TensorRT" in format_report([])
    text = format_report(check_trt(build(act_zp=3, clip=True)))
    assert text.splitlines()[0].startswith("2 errors, 1 warnings")   # the Q and the DQ both carry the zero point
