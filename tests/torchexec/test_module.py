"""OnnxModule on small inline graphs: parameters by ONNX name, capture / replace / sub-range runs,
hooks, static shape values with a dynamic axis, write-back, errors, and autograd against finite
differences on an attention graph."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from carsam_onnx.torchexec.module import OnnxModule
from carsam_onnx.errors import InputError, ModelError, UnsupportedOpError

RNG = np.random.default_rng(0)
D, H = 8, 2  # attention width and heads


def _model(nodes, inputs, outputs, inits, opset=21):
    g = helper.make_graph(nodes, "g", inputs, outputs,
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def attention_model(dtype=np.float32, elem=TensorProto.FLOAT):
    """x[B, N, D] -> q/k/v projections -> per-head QK^T / sqrt(d) -> Softmax -> AV -> out proj.
    The head split is shape arithmetic on the dynamic N (Shape -> Gather -> Concat -> Reshape), as in
    TorchScript exports. Initializer names contain characters nn.Module forbids."""
    inits = {f"onnx::MatMul_{n}": RNG.normal(scale=D ** -0.5, size=(D, D)).astype(dtype) for n in "qkvo"}
    inits["/attn/scale"] = np.array(np.sqrt(D // H), dtype)
    inits["heads"] = np.array([0, -1, H, D // H], np.int64)     # reshape target, N taken from Shape
    inits["i1"] = np.array([1], np.int64)
    inits["perm_back"] = np.array([0, -1, D], np.int64)
    nodes = [helper.make_node("Shape", ["x"], ["shape_x"]),
             helper.make_node("Gather", ["shape_x", "i1"], ["n"], axis=0),
             helper.make_node("Concat", ["zero", "n", "h", "dh"], ["split_shape"], axis=0),
             helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array([0], np.int64))),
             helper.make_node("Constant", [], ["h"], value=numpy_helper.from_array(np.array([H], np.int64))),
             helper.make_node("Constant", [], ["dh"], value=numpy_helper.from_array(np.array([D // H], np.int64)))]
    for n in "qkv":
        nodes += [helper.make_node("MatMul", ["x", f"onnx::MatMul_{n}"], [f"{n}_lin"], name=f"/attn/{n}_proj/MatMul"),
                  helper.make_node("Reshape", [f"{n}_lin", "split_shape"], [f"{n}_heads"]),
                  helper.make_node("Transpose", [f"{n}_heads"], [n], perm=[0, 2, 1, 3] if n != "k" else [0, 2, 3, 1])]
    nodes += [helper.make_node("MatMul", ["q", "k"], ["qk"], name="/attn/MatMul"),
              helper.make_node("Div", ["qk", "/attn/scale"], ["logits"], name="/attn/Div"),
              helper.make_node("Softmax", ["logits"], ["probs"], axis=-1, name="/attn/Softmax"),
              helper.make_node("MatMul", ["probs", "v"], ["av"], name="/attn/MatMul_1"),
              helper.make_node("Transpose", ["av"], ["av_t"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["av_t", "perm_back"], ["merged"]),
              helper.make_node("MatMul", ["merged", "onnx::MatMul_o"], ["y"], name="/attn/out_proj/MatMul")]
    # Constant nodes after their consumer: the executor sorts topologically
    x = helper.make_tensor_value_info("x", elem, [1, "N", D])
    y = helper.make_tensor_value_info("y", elem, [1, "N", D])
    g = helper.make_graph(nodes, "attn", [x], [y], [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def _ort(model, feeds):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def _sorted_model(model):
    """ORT needs topologically sorted nodes; the executor does not."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    order = OnnxModule._toposort(m.graph)
    del m.graph.node[:]
    m.graph.node.extend(order)
    return m


@pytest.fixture(scope="module")
def attn():
    return attention_model()


def test_matches_onnxruntime_for_several_sequence_lengths(attn):
    """The static shape values are cached per input shape: a new N must not reuse the old N's."""
    module = OnnxModule(attn)
    for n in (5, 3, 5, 1, 3):
        x = RNG.normal(size=(1, n, D)).astype(np.float32)
        got = module(x=torch.from_numpy(x))["y"].detach().numpy()
        want = _ort(_sorted_model(attn), {"x": x})["y"]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert len(module._plans) == 3


def test_static_nodes_are_skipped_after_the_first_run(attn):
    module = OnnxModule(attn)
    x = torch.randn(1, 4, D)
    module(x=x)
    plan = next(iter(module._plans.values()))
    run_ops = [step[-1].op_type for step in plan.fast_steps]
    assert "Shape" not in run_ops and "Concat" not in run_ops and "Gather" not in run_ops
    assert run_ops.count("MatMul") == 6


def test_parameters_are_addressed_by_onnx_name(attn):
    module = OnnxModule(attn)
    names = set(module.params_by_name)
    assert {"onnx::MatMul_q", "onnx::MatMul_o", "/attn/scale"} <= names
    assert "heads" in module.buffers_by_name and "heads" not in names
    assert module.param("onnx::MatMul_q").requires_grad
    assert sum(1 for _ in module.parameters()) == len(names)
    with pytest.raises(InputError, match="no float initializer"):
        module.param("heads")


def test_capture_replace_and_persistent_hooks(attn):
    module = OnnxModule(attn)
    x = torch.randn(1, 6, D)
    base = module.run({"x": x}, capture=["probs", "q"])
    assert base["probs"].shape == (1, H, 6, 6)
    torch.testing.assert_close(base["probs"].sum(-1), torch.ones(1, H, 6))
    # replacing the attention probabilities with uniform ones = mean of V
    uniform = module.run({"x": x}, replace={"probs": lambda p: torch.full_like(p, 1 / 6)}, capture=["v", "av"])
    torch.testing.assert_close(uniform["av"], uniform["v"].mean(-2, keepdim=True).expand_as(uniform["av"]))
    # replacing a parameter (e.g. fake-quantized weights) acts on this run only
    zero_q = module.run({"x": x}, replace={"onnx::MatMul_q": torch.zeros_like}, capture=["probs"])
    torch.testing.assert_close(zero_q["probs"], torch.full_like(zero_q["probs"], 1 / 6))
    torch.testing.assert_close(module(x=x)["y"], base["y"])
    # observers: a hook returning None sees the value and keeps it
    seen = []
    with module.value_hooks({"logits": lambda t: seen.append(t.detach().abs().max()) or None}):
        torch.testing.assert_close(module(x=x)["y"], base["y"])
    assert len(seen) == 1
    module(x=x)
    assert len(seen) == 1, "the hook is removed when the context ends"


def test_sub_range_runs_from_given_intermediate_values(attn):
    module = OnnxModule(attn)
    x = torch.randn(1, 5, D)
    full = module.run({"x": x}, capture=["probs", "v", "merged"])
    # start from the attention probabilities and V: only the tail of the graph runs, no x needed
    part = module.run(start={"probs": full["probs"], "v": full["v"]}, outputs=["y"])
    torch.testing.assert_close(part["y"], full["y"])
    plan = list(module._plans.values())[-1]
    assert {s[-1].name for s in plan.steps} == {"/attn/MatMul_1", "/attn/out_proj/MatMul", ""}
    assert not any(s[-1].name == "/attn/Softmax" for s in plan.steps)
    # gradients flow from the tail into a given value (block-wise reconstruction)
    probs = full["probs"].detach().requires_grad_(True)
    module.run(start={"probs": probs, "v": full["v"].detach()}, outputs=["y"])["y"].sum().backward()
    assert probs.grad is not None and probs.grad.abs().sum() > 0
    # a value the range needs but nobody gave
    with pytest.raises(InputError, match="graph input 'x' is needed"):
        module.run(start={"probs": full["probs"]}, outputs=["y"])


def test_unknown_names_and_missing_inputs_are_named(attn):
    module = OnnxModule(attn)
    x = torch.randn(1, 2, D)
    with pytest.raises(InputError, match="not in the graph: 'nope'"):
        module.run({"x": x}, capture=["nope"])
    with pytest.raises(InputError, match="not in the graph: 'nope'"):
        module.run({"x": x}, replace={"nope": lambda t: t})
    with pytest.raises(InputError, match="unknown graph inputs"):
        module.run({"x": x, "z": x})
    with pytest.raises(InputError, match="graph input 'x' is needed"):
        module.run({})
    with pytest.raises(InputError, match="'x' is torch.float64; the graph declares torch.float32"):
        module(x=x.double())
    with pytest.raises(ModelError, match="MatMul node '/attn/q_proj/MatMul' failed"):  # wrong width
        module(x=torch.randn(1, 2, D + 1))


def test_unsupported_op_error_names_op_node_and_opset():
    m = _model([helper.make_node("Det", ["x"], ["y"], name="my_det")],
               [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 3])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])], {}, opset=19)
    with pytest.raises(UnsupportedOpError, match=r"op Det \(node 'my_det', opset 19\)"):
        OnnxModule(m)
    m = _model([helper.make_node("Foo", ["x"], ["y"], name="n1", domain="com.example")],
               [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])], {})
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(UnsupportedOpError, match=r"com.example::Foo \(node 'n1', opset 1\)"):
        OnnxModule(m)


def test_write_back_keeps_names_order_and_the_rest_of_the_model(attn, tmp_path):
    attn = onnx.ModelProto.FromString(attn.SerializeToString())
    attn.metadata_props.add(key="carsam.part", value="decoder")
    module = OnnxModule(attn)
    with torch.no_grad():
        module.param("onnx::MatMul_v").mul_(2.0)
    out = module.to_model_proto()
    assert [t.name for t in out.graph.initializer] == [t.name for t in attn.graph.initializer]
    assert [t.data_type for t in out.graph.initializer] == [t.data_type for t in attn.graph.initializer]
    assert out.graph.node == attn.graph.node and out.metadata_props == attn.metadata_props
    assert out.opset_import == attn.opset_import
    got = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    orig = {t.name: numpy_helper.to_array(t) for t in attn.graph.initializer}
    np.testing.assert_array_equal(got["onnx::MatMul_v"], 2 * orig["onnx::MatMul_v"])
    np.testing.assert_array_equal(got["heads"], orig["heads"])
    x = RNG.normal(size=(1, 4, D)).astype(np.float32)
    np.testing.assert_allclose(_ort(_sorted_model(out), {"x": x})["y"],
                               module(x=torch.from_numpy(x))["y"].detach().numpy(), rtol=1e-5, atol=1e-6)


def test_autograd_matches_finite_differences_on_attention():
    """float64 graph: gradients w.r.t. the input and every projection weight, by torch.autograd.gradcheck."""
    module = OnnxModule(attention_model(np.float64, TensorProto.DOUBLE))
    x = torch.randn(1, 4, D, dtype=torch.float64, requires_grad=True)
    names = ["onnx::MatMul_q", "onnx::MatMul_k", "onnx::MatMul_v", "onnx::MatMul_o"]
    weights = [module.param(n) for n in names]

    def f(x, *ws):
        return module.run({"x": x}, replace={n: (lambda _, w=w: w) for n, w in zip(names, ws)})["y"]
    assert torch.autograd.gradcheck(f, (x, *[w.detach().clone().requires_grad_(True) for w in weights]),
                                    eps=1e-6, atol=1e-6, rtol=1e-4)
    # and the parameters themselves receive gradients through a plain forward
    module(x=x)["y"].pow(2).sum().backward()
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in weights)


def test_constant_folding_and_cuda_move(attn):
    module = OnnxModule(attn)
    assert {"zero", "h", "dh", "split_shape"} - set(module._consts) == {"split_shape"}
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine (the device benchmark covers .to('cuda'))")
    x = torch.randn(1, 5, D)
    want = module(x=x)["y"]
    module.to("cuda")
    assert all(p.is_cuda for p in module.parameters())
    got = module(x=x.cuda())["y"]
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5)


def test_changing_an_integer_initializer_rebuilds_the_cached_plan(attn):
    """Buffers count as constants for the static-value cache; an in-place change must not go stale."""
    module = OnnxModule(attn)
    x = torch.randn(1, 4, D)
    y1 = module(x=x)["y"]
    module(x=x)
    with torch.no_grad():   # i1 picks N out of Shape(x) for the (cached) head-split shape; 2 picks D instead
        module.buffer("i1").fill_(2)
    with pytest.raises(ModelError, match="Reshape node"):
        module(x=x)
    with torch.no_grad():
        module.buffer("i1").fill_(1)
    torch.testing.assert_close(module(x=x)["y"], y1)
