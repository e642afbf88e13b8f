"""plan_quantization: weight sites with output-channel axes, keep-float patterns, activation sites."""
from __future__ import annotations

import re
from collections import Counter
from functools import lru_cache

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from carsam_onnx.config import DEFAULT_KEEP_FLOAT, BitWidths, QuantConfig
from carsam_onnx.errors import InputError, ModelError
from carsam_onnx.passes.plan import plan_quantization, unmatched_patterns
from carsam_onnx.passes.sites import ActivationKind, WeightKind
from onnx_graphs import float_input as _vi
from onnx_graphs import make_model as _model
from sam_models import official_decoder_path, sam_onnx_path

ATTN_KINDS = {ActivationKind.ATTN_Q, ActivationKind.ATTN_K, ActivationKind.ATTN_PROBS, ActivationKind.ATTN_V}


@lru_cache(maxsize=1)
def _load(path: str) -> onnx.ModelProto:
    return onnx.load(path)


def _sam(part="full", exporter="dynamo"):
    return _load(str(sam_onnx_path("vit_b", part, exporter)))


def check_plan_names(model, plan):
    """Every name in the plan exists in the graph with the role the plan gives it."""
    nodes = {n.name: n for n in model.graph.node}
    inits = {t.name: t for t in model.graph.initializer}
    for w in plan.weights:
        node = nodes[w.node]
        if w.kind == WeightKind.CONSTANT:   # a large float constant read by one non-layer node
            assert w.initializer in node.input and w.initializer in inits
            assert w.axis == len(inits[w.initializer].dims) - 1
            assert node.op_type not in ("MatMul", "Gemm", "Conv", "ConvTranspose")
            continue
        assert node.input[1] == w.initializer and w.initializer in inits
        dims = list(inits[w.initializer].dims)
        expect = {"MatMul": len(dims) - 1, "Gemm": 0 if _attr(node, "transB", 0) else 1, "Conv": 0,
                  "ConvTranspose": 1}[node.op_type]
        assert w.axis == expect, (w.node, w.axis)
        assert w.kind == {"MatMul": WeightKind.LINEAR, "Gemm": WeightKind.LINEAR, "Conv": WeightKind.CONV,
                          "ConvTranspose": WeightKind.CONV_TRANSPOSE}[node.op_type]
    layers = [w.node for w in plan.weights if w.kind != WeightKind.CONSTANT]
    assert len(set(layers)) == len(layers)
    assert len({w.initializer for w in plan.weights}) == len(plan.weights)
    values = [a.value for a in plan.activations]
    assert len(set(values)) == len(values)  # one site per value
    weight_nodes = {w.node for w in plan.weights if w.kind != WeightKind.CONSTANT}
    attn_nodes = {n for s in plan.attention for n in (s.qk_matmul, s.av_matmul)}
    for a in plan.activations:
        assert a.consumers
        for c in a.consumers:
            assert a.value in nodes[c].input
            assert c in weight_nodes or c in attn_nodes
    for name, reason in plan.kept_float:
        assert name in nodes and reason


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_vit_b_full_plan(exporter):
    model = _sam("full", exporter)
    plan = plan_quantization(model, QuantConfig())
    check_plan_names(model, plan)
    # 12 blocks x (qkv, proj, lin1, lin2) + 2 neck convs + decoder 7 attentions x 4 + 2 MLPs x 2.
    layers = [w for w in plan.weights if w.kind != WeightKind.CONSTANT]
    assert len(layers) == 48 + 2 + 32
    assert Counter(w.kind for w in layers) == {WeightKind.LINEAR: 80, WeightKind.CONV: 2}
    constants = {w.initializer for w in plan.weights if w.kind == WeightKind.CONSTANT}
    assert any("pos_embed" in c for c in constants)   # pos_embed is stored quantized, weight-only
    assert len(plan.attention) == 19
    kinds = Counter(a.kind for a in plan.activations)
    assert {k: kinds[k] for k in ATTN_KINDS} == {k: 19 for k in ATTN_KINDS}
    # Layer inputs: encoder 4 per block + 2 neck convs; decoder: the 32 linear layers read 24 distinct values
    # (q/k/v of layer 0 self-attention share one input; token/image streams feed several projections).
    assert kinds[ActivationKind.LAYER_INPUT] == 48 + 2 + 24
    # Default keep-float: patch embedding, mask upscaling, hypernetwork MLPs, IoU head, prompt-encoder PE.
    kept = dict(plan.kept_float)
    assert sum("patch_embed" in n for n in kept) == 1
    assert sum("output_upscaling" in n for n in kept) == 2
    assert sum("output_hypernetworks_mlps" in n for n in kept) == 12
    assert sum("iou_prediction_head" in n for n in kept) == 3
    weight_nodes = {w.node for w in plan.weights if w.kind != WeightKind.CONSTANT}
    assert not any(re.search(p, n) for p in DEFAULT_KEEP_FLOAT for n in weight_nodes)


def test_official_decoder_plan_keeps_prompt_encoder_by_initializer_name():
    """Its prompt-encoder nodes are named "/mask_downscaling/..." and "/MatMul"; the weights carry the path."""
    model = _load(str(official_decoder_path()))
    plan = plan_quantization(model, QuantConfig())
    check_plan_names(model, plan)
    assert len(plan.weights) == 32 and len(plan.attention) == 7
    kept = dict(plan.kept_float)
    downscaling = [n for n in kept if "mask_downscaling" in n]
    assert len(downscaling) == 3 and all("prompt_encoder" in kept[n] for n in downscaling)
    assert all(w.kind == WeightKind.LINEAR and "transformer" in w.node for w in plan.weights)


def test_keep_float_override_and_attention_patterns():
    model = _sam("full", "dynamo")
    everything = plan_quantization(model, QuantConfig(keep_float=()))
    check_plan_names(model, everything)
    by_node = {w.node: w for w in everything.weights}
    # Nothing kept by pattern: patch embedding, ConvTranspose upscaling and Gemm heads are weight sites.
    assert by_node["/image_encoder.patch_embed.proj/Conv"].axis == 0
    assert by_node["/mask_decoder.output_upscaling.0/ConvTranspose"].axis == 1
    assert by_node["/mask_decoder.iou_prediction_head.layers.0/Gemm"].axis == 0  # transB=1
    layers = [w for w in everything.weights if w.kind != WeightKind.CONSTANT]
    assert len(layers) == 82 + 1 + 2 + 12 + 3 + 1  # + the point-coordinate PE MatMul
    # Keeping the image encoder in float removes its weights and its attention sites (recorded with reasons).
    dec_only = plan_quantization(model, QuantConfig(keep_float=DEFAULT_KEEP_FLOAT + (r"image_encoder",)))
    check_plan_names(model, dec_only)
    assert len(dec_only.weights) == 32 and len(dec_only.attention) == 7
    assert all(s.role.value.startswith("decoder") for s in dec_only.attention)
    kept = dict(dec_only.kept_float)
    assert sum(r.startswith("attention kept float") for r in kept.values()) == 24  # 12 sites x 2 MatMuls
    assert not any("image_encoder" in a.value or any("image_encoder" in c for c in a.consumers)
                   for a in dec_only.activations)


def test_keep_float_patterns_that_match_nothing_are_named():
    """A pattern that matches no node keeps nothing float (a typo, most often): quantize names it in a warning."""
    model = _sam("full", "dynamo")
    assert unmatched_patterns(model, (r"image_encoder", r"imgae_encoder", r"mask_decoder\.transformer")) == [
        "imgae_encoder"]
    assert unmatched_patterns(model, DEFAULT_KEEP_FLOAT) == []          # every default names a part of a full SAM
    assert unmatched_patterns(model, ()) == []


def test_weight_only_bits_have_no_activation_sites():
    model = _sam("decoder", "dynamo")
    a8 = plan_quantization(model, QuantConfig(bits=BitWidths(4, 8)))
    a16 = plan_quantization(model, QuantConfig(bits=BitWidths(4, 16)))
    assert a16.activations == () and len(a8.activations) == 24 + 4 * 7
    assert a16.weights == a8.weights and a16.attention == a8.attention


def test_shared_value_is_one_site_with_all_consumers():
    model = _sam("decoder", "dynamo")
    plan = plan_quantization(model, QuantConfig())
    self0 = plan.attention[0]
    site = next(a for a in plan.activations if self0.q_proj in a.consumers)
    assert site.kind == ActivationKind.LAYER_INPUT
    assert set(site.consumers) == {self0.q_proj, self0.k_proj, self0.v_proj}
    for s in plan.attention:
        got = {a.value: (a.kind, a.consumers) for a in plan.activations}
        assert got[s.q_value] == (ActivationKind.ATTN_Q, (s.qk_matmul,))
        assert got[s.k_value] == (ActivationKind.ATTN_K, (s.qk_matmul,))
        assert got[s.probs_value] == (ActivationKind.ATTN_PROBS, (s.av_matmul,))
        assert got[s.v_value] == (ActivationKind.ATTN_V, (s.av_matmul,))


# ------------------------------------------------------------------------------------------ small graphs

def test_small_graph_axes_and_non_weight_layers():
    w = np.ones((8, 8), np.float32)
    const_w = helper.make_node("Constant", [], ["cw"], name="const_w", value=numpy_helper.from_array(w))
    nodes = [helper.make_node("Gemm", ["x", "Wg"], ["g"], name="gemm_nt"),             # transB=0 -> axis 1
             helper.make_node("Gemm", ["g", "Wt"], ["g2"], name="gemm_t", transB=1),   # transB=1 -> axis 0
             const_w,
             helper.make_node("MatMul", ["g2", "cw"], ["m"], name="mm_constant_node"),  # weight not an initializer
             helper.make_node("MatMul", ["Wl", "m"], ["m2"], name="mm_left"),           # W @ x
             helper.make_node("MatMul", ["m2", "m2"], ["m3"], name="mm_act"),           # activation x activation
             helper.make_node("Relu", ["m3"], ["y"], name="relu")]
    inits = {"Wg": w, "Wt": w, "Wl": w}
    model = _model(nodes, [_vi("x", [8, 8])], [_vi("y", [8, 8])], inits)
    onnx.checker.check_model(model, full_check=True)
    plan = plan_quantization(model, QuantConfig())
    assert [(s.node, s.initializer, s.axis) for s in plan.weights] == [("gemm_nt", "Wg", 1), ("gemm_t", "Wt", 0)]
    kept = dict(plan.kept_float)
    assert set(kept) == {"mm_constant_node", "mm_left"}
    assert "not an initializer" in kept["mm_constant_node"] and "left" in kept["mm_left"]
    assert [(a.value, a.consumers, a.kind) for a in plan.activations] == [
        ("x", ("gemm_nt",), ActivationKind.LAYER_INPUT), ("g", ("gemm_t",), ActivationKind.LAYER_INPUT)]
    assert plan.attention == ()


def test_require_attention_and_bad_pattern_raise_named_errors():
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")]
    model = _model(nodes, [_vi("x", [2, 4])], [_vi("y", [2, 4])], {"W": np.eye(4, dtype=np.float32)})
    assert len(plan_quantization(model, QuantConfig()).weights) == 1
    with pytest.raises(ModelError, match="no attention"):
        plan_quantization(model, QuantConfig(require_attention=True))
    with pytest.raises(InputError, match="regular expression"):
        plan_quantization(model, QuantConfig(keep_float=("patch_embed(",)))


def test_passes_do_not_import_torch():
    """Layering: the graph passes run without torch (calibration lives in calib/)."""
    import subprocess
    import sys
    code = ("import sys; import carsam_onnx.passes.attention, carsam_onnx.passes.plan; "
            "bad = [m for m in ('torch', 'carsam_onnx.calib') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_constant_sites_positive_and_negative():
    """A big float constant read by one non-layer node is a CONSTANT site (INT8, last axis); a small one, or one
    read by two nodes, is left alone."""
    rng = np.random.default_rng(0)
    big = numpy_helper.from_array(rng.standard_normal((64, 96)).astype(np.float32), "pos")
    shared = numpy_helper.from_array(rng.standard_normal((64, 96)).astype(np.float32), "shared")
    small = numpy_helper.from_array(rng.standard_normal((4, 96)).astype(np.float32), "small")
    w = numpy_helper.from_array(rng.standard_normal((96, 96)).astype(np.float32), "w")
    nodes = [helper.make_node("Add", ["x", "pos"], ["a"], name="add_pos"),
             helper.make_node("Add", ["a", "shared"], ["b"], name="add_shared1"),
             helper.make_node("Mul", ["b", "shared"], ["c"], name="mul_shared2"),
             helper.make_node("MatMul", ["c", "w"], ["d"], name="mm"),
             helper.make_node("Concat", ["d", "small"], ["y"], name="cat", axis=0)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 96])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [68, 96])],
                              [big, shared, small, w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    plan = plan_quantization(model, QuantConfig())
    consts = [s for s in plan.weights if s.kind == WeightKind.CONSTANT]
    assert [(s.initializer, s.node, s.axis) for s in consts] == [("pos", "add_pos", 1)]
    assert [s.initializer for s in plan.weights if s.kind == WeightKind.LINEAR] == ["w"]
