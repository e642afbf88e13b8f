"""find_attention: SAM's attention blocks found by structure, with roles and token->image/image->token pairs.

Node names are never read by the pass; the tests use them as an independent oracle (exports name nodes by
module path, e.g. "cross_attn_token_to_image", "blocks.5").
"""
from __future__ import annotations

import json
import re
from collections import Counter
from functools import lru_cache

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from carsam_onnx.passes.attention import attention_report, find_attention, inspect_attention
from carsam_onnx.passes.sites import Role
from onnx_graphs import float_input as _vi
from onnx_graphs import make_model as _model
from sam_models import official_decoder_path, sam_onnx_path

RNG = np.random.default_rng(0)
GLOBAL_BLOCKS = {"vit_b": (2, 5, 8, 11), "vit_l": (5, 11, 17, 23), "vit_h": (7, 15, 23, 31)}
DECODER_ROLES = [Role.DECODER_SELF, Role.DECODER_TOKEN_TO_IMAGE, Role.DECODER_IMAGE_TO_TOKEN] * 2 + [
    Role.DECODER_FINAL_TOKEN_TO_IMAGE]
# Module-path fragment of each decoder role in node names (both exporters and the official export).
ROLE_MODULE = {Role.DECODER_SELF: "self_attn", Role.DECODER_TOKEN_TO_IMAGE: "cross_attn_token_to_image",
               Role.DECODER_IMAGE_TO_TOKEN: "cross_attn_image_to_token",
               Role.DECODER_FINAL_TOKEN_TO_IMAGE: "final_attn_token_to_image"}


@lru_cache(maxsize=1)
def _load(path: str) -> onnx.ModelProto:
    return onnx.load(path)


def _sam(part: str, exporter: str) -> onnx.ModelProto:
    return _load(str(sam_onnx_path("vit_b", part, exporter)))


def _names(model):
    nodes = {n.name: n for n in model.graph.node}
    values = {v for n in model.graph.node for v in n.output} | {i.name for i in model.graph.input}
    return nodes, values


def _block_of(name: str) -> int:
    return int(re.search(r"blocks[./](\d+)", name).group(1))


def _layer_of(name: str) -> int | None:
    m = re.search(r"layers[./](\d+)", name)
    return int(m.group(1)) if m else None


def check_sites_well_formed(model, sites):
    """Every name exists; ops are what the role says; values are the inputs of the two attention MatMuls."""
    nodes, values = _names(model)
    inits = {t.name for t in model.graph.initializer}
    for s in sites:
        for f in ("qk_matmul", "softmax", "av_matmul", "q_proj", "k_proj", "v_proj", "out_proj"):
            assert getattr(s, f) in nodes, (f, getattr(s, f))
        for f in ("q_value", "k_value", "probs_value", "v_value"):
            assert getattr(s, f) in values
        assert nodes[s.qk_matmul].op_type == nodes[s.av_matmul].op_type == "MatMul"
        assert nodes[s.softmax].op_type == "Softmax"
        assert list(nodes[s.qk_matmul].input) == [s.q_value, s.k_value]
        assert list(nodes[s.av_matmul].input) == [s.probs_value, s.v_value]
        assert s.probs_value == nodes[s.softmax].output[0]
        for f in ("q_proj", "k_proj", "v_proj", "out_proj"):
            node = nodes[getattr(s, f)]
            assert node.op_type in ("MatMul", "Gemm") and node.input[1] in inits, (f, node.name)
        fused = s.q_proj == s.k_proj == s.v_proj
        assert fused == s.role.value.startswith("encoder")


def check_encoder(sites, model_type="vit_b"):
    enc = [s for s in sites if s.role in (Role.ENCODER_WINDOW, Role.ENCODER_GLOBAL)]
    depth = {"vit_b": 12, "vit_l": 24, "vit_h": 32}[model_type]
    assert len(enc) == depth
    assert [s.block for s in enc] == list(range(depth))
    for s in enc:
        assert _block_of(s.softmax) == s.block  # graph order = block order
        expect = Role.ENCODER_GLOBAL if s.block in GLOBAL_BLOCKS[model_type] else Role.ENCODER_WINDOW
        assert s.role == expect, (s.softmax, s.role)
        assert s.pair is None


def check_decoder(sites):
    dec = [s for s in sites if s.role.value.startswith("decoder")]
    assert [s.role for s in dec] == DECODER_ROLES
    for s in dec:
        assert ROLE_MODULE[s.role] in s.softmax and ROLE_MODULE[s.role] in s.q_proj, (s.role, s.softmax)
        assert s.block == _layer_of(s.softmax)
    cross = [s for s in dec if s.role in (Role.DECODER_TOKEN_TO_IMAGE, Role.DECODER_IMAGE_TO_TOKEN)]
    pairs = Counter(s.pair for s in cross)
    assert pairs == {0: 2, 1: 2}
    for s in cross:
        assert s.pair == s.block  # the two sites of layer i share pair id i
    assert all(s.pair is None for s in dec if s not in cross)


# ------------------------------------------------------------------------------------------ real exports

@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("part", ["full", "encoder", "decoder"])
def test_vit_b_exports(part, exporter):
    model = _sam(part, exporter)
    sites, rejected = find_attention(model)
    n_enc, n_dec = {"full": (12, 7), "encoder": (12, 0), "decoder": (0, 7)}[part]
    roles = Counter(s.role for s in sites)
    assert roles[Role.ENCODER_WINDOW] == (8 if n_enc else 0)
    assert roles[Role.ENCODER_GLOBAL] == (4 if n_enc else 0)
    assert len(sites) == n_enc + n_dec
    assert rejected == []
    check_sites_well_formed(model, sites)
    if n_enc:
        check_encoder(sites)
    if n_dec:
        check_decoder(sites)


def test_official_decoder_export():
    """segment-anything's SamOnnxModel export: TorchScript, opset 17, weights named onnx::MatMul_*."""
    model = _load(str(official_decoder_path()))
    assert any(t.name.startswith("onnx::MatMul_") for t in model.graph.initializer)
    sites, rejected = find_attention(model)
    assert len(sites) == 7 and rejected == []
    check_sites_well_formed(model, sites)
    check_decoder(sites)


def test_report_is_json_and_pairs_cross_sites():
    model = _sam("decoder", "dynamo")
    report = inspect_attention(model)
    json.dumps(report)
    assert report["attention_rejected"] == []
    sites = report["attention"]
    assert sites == attention_report(model)
    required = {"role", "qk_matmul", "softmax", "av_matmul", "q_proj", "k_proj", "v_proj", "out_proj", "pair"}
    assert all(required <= set(s) for s in sites)
    by_pair = {}
    for s in sites:
        if s["role"] in ("decoder_token_to_image", "decoder_image_to_token"):
            by_pair.setdefault(s["pair"], set()).add(s["role"])
    assert by_pair == {0: {"decoder_token_to_image", "decoder_image_to_token"},
                       1: {"decoder_token_to_image", "decoder_image_to_token"}}
    # The scale is found for every site (Div of the scores in the decoder).
    assert all(s["scale"] for s in sites)


def test_encoder_report_records_scale_on_q_and_rel_pos_terms():
    report = inspect_attention(_sam("encoder", "torchscript"))["attention"]
    assert len(report) == 12
    for s in report:
        assert s["scale"] and len(s["score_terms"]) == 2  # Mul(q, 0.125); rel-pos h and w terms


def test_softmax_head_added_to_sam_decoder_is_left_alone():
    """A Softmax over the IoU predictions (a classifier-style head) is rejected; the 7 sites stay."""
    model = onnx.ModelProto()
    model.CopyFrom(_sam("decoder", "dynamo"))
    model.graph.node.append(helper.make_node("Softmax", ["iou_predictions"], ["iou_softmax"], name="extra_softmax"))
    model.graph.output.append(helper.make_tensor_value_info("iou_softmax", TensorProto.FLOAT, None))
    sites, rejected = find_attention(model)
    assert len(sites) == 7
    assert [r.softmax for r in rejected] == ["extra_softmax"]
    assert "not attention probabilities" in rejected[0].reason


@pytest.mark.slow
@pytest.mark.parametrize("model_type,depth", [("vit_l", 24), ("vit_h", 32)])
def test_large_encoders(model_type, depth):
    """vit_l / vit_h encoder exports (dynamo; exported once and cached: minutes, vit_h writes ~2.5 GB)."""
    path = sam_onnx_path(model_type, "encoder", "dynamo")
    model = onnx.load(str(path), load_external_data=False)  # structure only: weights are not needed
    sites, rejected = find_attention(model)
    assert len(sites) == depth and rejected == []
    assert Counter(s.role for s in sites) == {Role.ENCODER_WINDOW: depth - 4, Role.ENCODER_GLOBAL: 4}
    check_encoder(sites, model_type)


# ------------------------------------------------------------------------------------------ small graphs

def _w(*shape):
    return (RNG.normal(size=shape) / np.sqrt(shape[0])).astype(np.float32)


def _i64(*v):
    return np.array(v, np.int64)


def _heads_tail(nodes, inits, av_out, tokens, dim, batch):
    """attn.V output [B, heads, N, hd] -> [B, N, D] -> out projection."""
    inits.update(Wo=_w(dim, dim), bo=np.zeros(dim, np.float32), shape_out=_i64(batch, tokens, dim))
    nodes += [helper.make_node("Transpose", [av_out], ["o_t"], perm=[0, 2, 1, 3], name="o_t"),
              helper.make_node("Reshape", ["o_t", "shape_out"], ["o_r"], name="o_r"),
              helper.make_node("MatMul", ["o_r", "Wo"], ["o_mm"], name="out_proj"),
              helper.make_node("Add", ["o_mm", "bo"], ["y"], name="out_bias")]


def separate_qkv_attention(tokens=6, dim=8, heads=2):
    """Decoder-style self-attention: three projections, K transposed to [0,2,3,1], scores divided by sqrt(hd)."""
    hd = dim // heads
    inits = {"split_shape": _i64(1, tokens, heads, hd), "sqrt_hd": np.array(np.sqrt(hd), np.float32)}
    nodes = []
    for p, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        inits[f"W{p}"], inits[f"b{p}"] = _w(dim, dim), np.zeros(dim, np.float32)
        nodes += [helper.make_node("MatMul", ["x", f"W{p}"], [f"{p}_mm"], name=f"{p}_proj"),
                  helper.make_node("Add", [f"{p}_mm", f"b{p}"], [f"{p}_b"], name=f"{p}_bias"),
                  helper.make_node("Reshape", [f"{p}_b", "split_shape"], [f"{p}_r"], name=f"{p}_r"),
                  helper.make_node("Transpose", [f"{p}_r"], [f"{p}_t"], perm=perm, name=f"{p}_t")]
    nodes += [helper.make_node("MatMul", ["q_t", "k_t"], ["s"], name="qk"),
              helper.make_node("Div", ["s", "sqrt_hd"], ["s_scaled"], name="scale"),
              helper.make_node("Softmax", ["s_scaled"], ["p"], axis=-1, name="softmax"),
              helper.make_node("MatMul", ["p", "v_t"], ["o"], name="av")]
    _heads_tail(nodes, inits, "o", tokens, dim, 1)
    return _model(nodes, [_vi("x", [1, tokens, dim])], [_vi("y", [1, tokens, dim])], inits)


def fused_qkv_attention(windowed: bool, grid=4, window=2, dim=8, heads=2):
    """Encoder-style block: one qkv projection, Split + Squeeze, q scaled by a Mul; optionally on windows
    cut out by SAM's partition (Reshape -> Transpose(0,1,3,2,4,5) -> Reshape)."""
    hd = dim // heads
    inits = {"qkv_W": _w(dim, 3 * dim), "qkv_b": np.zeros(3 * dim, np.float32), "split": _i64(1, 1, 1),
             "axis0": _i64(0), "q_scale": np.array(hd ** -0.5, np.float32)}
    nodes = []
    x = "x"
    batch, tokens = (grid // window) ** 2 if windowed else 1, window * window if windowed else grid * grid
    if windowed:
        n = grid // window
        inits.update(win6=_i64(1, n, window, n, window, dim), win3=_i64(batch, tokens, dim))
        nodes += [helper.make_node("Reshape", ["x", "win6"], ["w6"], name="win_r"),
                  helper.make_node("Transpose", ["w6"], ["w6t"], perm=[0, 1, 3, 2, 4, 5], name="win_t"),
                  helper.make_node("Reshape", ["w6t", "win3"], ["xw"], name="win_r2")]
        x = "xw"
    else:
        inits["flat"] = _i64(1, tokens, dim)
        nodes.append(helper.make_node("Reshape", ["x", "flat"], ["xf"], name="flat"))
        x = "xf"
    inits["qkv5"] = _i64(batch, tokens, 3, heads, hd)
    nodes += [helper.make_node("MatMul", [x, "qkv_W"], ["qkv_mm"], name="qkv_proj"),
              helper.make_node("Add", ["qkv_mm", "qkv_b"], ["qkv"], name="qkv_bias"),
              helper.make_node("Reshape", ["qkv", "qkv5"], ["qkv_r"], name="qkv_r"),
              helper.make_node("Transpose", ["qkv_r"], ["qkv_t"], perm=[2, 0, 3, 1, 4], name="qkv_t"),
              helper.make_node("Split", ["qkv_t", "split"], ["q3", "k3", "v3"], axis=0, name="split"),
              helper.make_node("Squeeze", ["q3", "axis0"], ["q"], name="sq_q"),
              helper.make_node("Squeeze", ["k3", "axis0"], ["k"], name="sq_k"),
              helper.make_node("Squeeze", ["v3", "axis0"], ["v"], name="sq_v"),
              helper.make_node("Mul", ["q", "q_scale"], ["qs"], name="scale"),
              helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2], name="kt"),
              helper.make_node("MatMul", ["qs", "kt"], ["s"], name="qk"),
              helper.make_node("Softmax", ["s"], ["p"], axis=-1, name="softmax"),
              helper.make_node("MatMul", ["p", "v"], ["o"], name="av")]
    _heads_tail(nodes, inits, "o", tokens, dim, batch)
    in_shape = [1, grid, grid, dim]
    return _model(nodes, [_vi("x", in_shape)], [_vi("y", [batch, tokens, dim])], inits)


def _runs(model):
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: RNG.normal(size=[d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
             for i in model.graph.input}
    out = sess.run(None, feeds)
    assert all(np.isfinite(o).all() for o in out)


def test_separate_projections_make_a_decoder_self_site():
    model = separate_qkv_attention()
    _runs(model)
    before = model.SerializeToString()
    sites, rejected = find_attention(model)
    assert model.SerializeToString() == before  # the input model is never modified
    assert rejected == []
    (s,) = sites
    assert s.role == Role.DECODER_SELF and s.block == 0 and s.pair is None
    assert (s.qk_matmul, s.softmax, s.av_matmul) == ("qk", "softmax", "av")
    assert (s.q_proj, s.k_proj, s.v_proj, s.out_proj) == ("q_proj", "k_proj", "v_proj", "out_proj")
    assert (s.q_value, s.k_value, s.probs_value, s.v_value) == ("q_t", "k_t", "p", "v_t")
    assert attention_report(model)[0]["scale"] == "scale"


@pytest.mark.parametrize("windowed", [True, False])
def test_fused_qkv_window_or_global(windowed):
    model = fused_qkv_attention(windowed)
    _runs(model)
    sites, rejected = find_attention(model)
    assert rejected == []
    (s,) = sites
    assert s.role == (Role.ENCODER_WINDOW if windowed else Role.ENCODER_GLOBAL)
    assert s.q_proj == s.k_proj == s.v_proj == "qkv_proj" and s.out_proj == "out_proj"
    assert (s.q_value, s.k_value, s.probs_value, s.v_value) == ("qs", "kt", "p", "v")


def test_plain_mlp_has_no_sites():
    inits = {"W1": _w(8, 16), "b1": np.zeros(16, np.float32), "W2": _w(16, 8)}
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="fc1_bias"),
             helper.make_node("Relu", ["hb"], ["a"], name="relu"),
             helper.make_node("MatMul", ["a", "W2"], ["y"], name="fc2")]
    model = _model(nodes, [_vi("x", [4, 8])], [_vi("y", [4, 8])], inits)
    _runs(model)
    assert find_attention(model) == ([], [])


def test_classifier_softmax_is_rejected_with_reason():
    """Linear -> Softmax -> output: a classifier head, not attention."""
    inits = {"W": _w(8, 5), "b": np.zeros(5, np.float32)}
    nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["logits"], name="fc"),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=-1, name="cls_softmax")]
    model = _model(nodes, [_vi("x", [4, 8])], [_vi("probs", [4, 5])], inits)
    _runs(model)
    sites, rejected = find_attention(model)
    assert sites == []
    assert [r.softmax for r in rejected] == ["cls_softmax"]
    assert "not attention probabilities" in rejected[0].reason


def test_softmax_of_a_linear_layer_feeding_matmul_is_rejected():
    """Softmax(x @ W) @ x: the scores come from a linear layer, not from Q.K^T."""
    inits = {"W": _w(8, 4)}
    nodes = [helper.make_node("MatMul", ["x", "W"], ["s"], name="scores"),
             helper.make_node("Softmax", ["s"], ["p"], axis=-1, name="softmax"),
             helper.make_node("MatMul", ["p", "v"], ["y"], name="mix")]
    model = _model(nodes, [_vi("x", [4, 8]), _vi("v", [4, 3])], [_vi("y", [4, 3])], inits)
    _runs(model)
    sites, rejected = find_attention(model)
    assert sites == [] and len(rejected) == 1
    assert "constant operand" in rejected[0].reason


def test_attention_without_projections_is_rejected():
    """softmax(q k^T / 2) v on graph inputs: the attention core alone, no q/k/v projections."""
    inits = {"two": np.array(2.0, np.float32)}
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="kt"),
             helper.make_node("MatMul", ["q", "kt"], ["s"], name="qk"),
             helper.make_node("Div", ["s", "two"], ["s2"], name="scale"),
             helper.make_node("Softmax", ["s2"], ["p"], axis=-1, name="softmax"),
             helper.make_node("MatMul", ["p", "v"], ["y"], name="av")]
    shape = [2, 5, 4]
    model = _model(nodes, [_vi("q", shape), _vi("k", shape), _vi("v", shape)], [_vi("y", shape)], inits)
    _runs(model)
    sites, rejected = find_attention(model)
    assert sites == [] and len(rejected) == 1
    assert rejected[0].reason.startswith("no linear projection behind Q")


def test_attention_without_output_projection_is_rejected():
    model = separate_qkv_attention()
    out_proj = next(n for n in model.graph.node if n.name == "out_proj")
    out_proj.op_type = "Mul"  # attn.V output now feeds an elementwise op, not a linear layer
    out_proj.name = "not_a_projection"
    sites, rejected = find_attention(model)
    assert sites == [] and "output projection" in rejected[0].reason


def test_cast_between_softmax_and_attn_v_is_crossed():
    """Mixed-precision exports cast the probabilities before attn.V; the quantized value is the cast output."""
    model = separate_qkv_attention()
    nodes = list(model.graph.node)
    av = next(i for i, n in enumerate(nodes) if n.name == "av")
    nodes[av].input[0] = "p_cast"
    nodes.insert(av, helper.make_node("Cast", ["p"], ["p_cast"], to=TensorProto.FLOAT, name="cast_probs"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    _runs(model)
    (s,), rejected = find_attention(model)
    assert rejected == [] and s.softmax == "softmax" and s.probs_value == "p_cast"


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_reference_arch_without_window_padding(exporter):
    """The project's reference arch (256 px, width 384, 6 heads, window 8): 16x16 tokens split into 2x2
    windows with no Pad before the partition; same roles and block indices as vit_b. (The trained weights'
    export: the graph's structure does not depend on the weights, and the dynamo file is shared with the
    reconstruction and runtime-parity tests.)"""
    from sam_models import reference_onnx_path

    from carsam_onnx.export.models import REFERENCE_WEIGHTS

    if not REFERENCE_WEIGHTS.is_file():
        pytest.skip(f"bundled reference weights not present at {REFERENCE_WEIGHTS}")
    model = onnx.load(str(reference_onnx_path("full", exporter)))
    assert not any(n.op_type == "Pad" for n in model.graph.node if "blocks" in n.name)
    sites, rejected = find_attention(model)
    assert rejected == [] and len(sites) == 19
    check_sites_well_formed(model, sites)
    check_encoder(sites)  # global blocks 2, 5, 8, 11 as vit_b
    check_decoder(sites)


def test_duplicated_node_names_are_a_model_error():
    from carsam_onnx.errors import ModelError
    model = separate_qkv_attention()
    next(n for n in model.graph.node if n.name == "k_proj").name = "q_proj"
    with pytest.raises(ModelError, match="two nodes named 'q_proj'"):
        find_attention(model)
