"""QuantizeLinear / DequantizeLinear in the torch executor against ONNX Runtime (int8/uint8/int4/uint4;
per-tensor, per-axis, blocked), the straight-through gradients, and fake_quant."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from carsam_onnx.torchexec.module import OnnxModule
from carsam_onnx.qmath import ONNX_QRANGE, grid
from carsam_onnx.torchexec.fakequant import fake_quant, lsq_drop, lsq_grad_factor

RNG = np.random.default_rng(0)
TYPES = {"int8": TensorProto.INT8, "uint8": TensorProto.UINT8, "int4": TensorProto.INT4, "uint4": TensorProto.UINT4}


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _qparams(granularity: str, shape, axis: int, block: int, qtype: int):
    qmin, qmax = ONNX_QRANGE[qtype]
    if granularity == "tensor":
        pshape = []
    elif granularity == "axis":
        pshape = [shape[axis]]
    else:
        pshape = list(shape)
        pshape[axis] = -(-shape[axis] // block)
    scale = RNG.uniform(0.02, 0.1, size=pshape).astype(np.float32)
    zp = RNG.integers(qmin, qmax + 1, size=pshape) if qmin >= 0 else RNG.integers(-2, 3, size=pshape)
    return scale, zp


def qdq_model(qtype: int, granularity: str, x_shape=(4, 6, 8), axis=1, block=4):
    """x -> QuantizeLinear -> (y: integer codes) -> DequantizeLinear -> z, plus a DQ of an integer weight."""
    scale, zp = _qparams(granularity, x_shape, axis, block, qtype)
    qmin, qmax = ONNX_QRANGE[qtype]
    w = RNG.integers(qmin, qmax + 1, size=x_shape)
    attrs = {} if granularity == "tensor" else {"axis": axis}
    if granularity == "block":
        attrs["block_size"] = block
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["y"], **attrs),
             helper.make_node("DequantizeLinear", ["y", "s", "zp"], ["z"], **attrs),
             helper.make_node("DequantizeLinear", ["w", "s", "zp"], ["wd"], **attrs)]
    inits = [numpy_helper.from_array(scale, "s"), helper.make_tensor("zp", qtype, zp.shape, zp.reshape(-1).tolist()),
             helper.make_tensor("w", qtype, w.shape, w.reshape(-1).tolist())]
    outputs = [helper.make_tensor_value_info("z", TensorProto.FLOAT, x_shape),
               helper.make_tensor_value_info("wd", TensorProto.FLOAT, x_shape)]
    if qtype not in (TensorProto.INT4, TensorProto.UINT4):  # ORT's Python API cannot return 4-bit tensors
        outputs.append(helper.make_tensor_value_info("y", qtype, x_shape))
    g = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(m)
    return m


@pytest.mark.parametrize("granularity", ["tensor", "axis", "block"])
@pytest.mark.parametrize("tname", list(TYPES))
def test_qdq_matches_onnxruntime(tname, granularity):
    model = qdq_model(TYPES[tname], granularity)
    qmin, qmax = ONNX_QRANGE[TYPES[tname]]
    # values spread over the whole grid and beyond it (saturation), plus exact .5 ties of the code
    x = (RNG.uniform(-1.3, 1.3, size=(4, 6, 8)) * (qmax - qmin) * 0.1).astype(np.float32)
    s0 = numpy_helper.to_array({t.name: t for t in model.graph.initializer}["s"]).reshape(-1)[0]
    x.flat[:8] = s0 * (np.arange(8, dtype=np.float32) - 3.5)
    sess = _session(model)
    want = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": x})))
    module = OnnxModule(model)
    got = module.run({"x": torch.from_numpy(x)}, capture=["y"])
    np.testing.assert_allclose(got["z"].detach().numpy(), want["z"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(got["wd"].detach().numpy(), want["wd"], rtol=0, atol=1e-6)
    codes = got["y"].detach().numpy()
    if "y" in want:
        np.testing.assert_array_equal(codes.astype(np.int64), want["y"].astype(np.int64))
    assert codes.min() == qmin and codes.max() == qmax, "the case must exercise saturation"


def test_int4_initializer_round_trips_through_write_back():
    model = qdq_model(TensorProto.INT4, "axis")
    module = OnnxModule(model)
    assert module.buffer("w").dtype == torch.int8
    back = module.to_model_proto()
    t = {i.name: i for i in back.graph.initializer}["w"]
    assert t.data_type == TensorProto.INT4
    orig = {i.name: i for i in model.graph.initializer}["w"]
    np.testing.assert_array_equal(numpy_helper.to_array(t).astype(np.int8), numpy_helper.to_array(orig).astype(np.int8))


def test_straight_through_gradients_of_a_qdq_pair():
    """d z / d x = 1 inside the grid, 0 where Q saturates; d z / d scale is LSQ's round(x/s) - x/s inside."""
    model = qdq_model(TensorProto.INT8, "tensor")
    module = OnnxModule(model)
    s = module.param("s")
    zp = float(module.buffer("zp"))
    x = torch.linspace(-12, 12, 4 * 6 * 8)
    x[:4] = (torch.tensor([-128.3, -127.8, 126.7, 127.2]) - zp) * s.detach()   # codes on the grid's bounds
    x = x.reshape(4, 6, 8).requires_grad_(True)
    z = module.run({"x": x}, outputs=["z"])["z"]
    z.sum().backward()
    v = x.detach() / s.detach()
    code = torch.round(v) + zp
    inside = (code >= -128) & (code <= 127)   # codes on a bound are in range (clamp_ste)
    edge = (code == -128) | (code == 127)
    assert inside.any() and (~inside).any() and edge.any()
    torch.testing.assert_close(x.grad, inside.float(), rtol=0, atol=0)
    lsq = torch.where(inside, torch.round(v) - v, torch.clamp(code, -128, 127) - zp)
    torch.testing.assert_close(s.grad, lsq.sum().reshape(s.shape), rtol=1e-4, atol=1e-3)


def test_fake_quant_equals_the_qdq_graph_and_learns_its_scale():
    model = qdq_model(TensorProto.UINT8, "axis")
    module = OnnxModule(model)
    x = torch.from_numpy(RNG.normal(size=(4, 6, 8)).astype(np.float32))
    want = module(x=x)["z"]
    s, zp = module.param("s"), module.buffer("zp")
    got = fake_quant(x, s, zp, 0, 255, axis=1)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # LSQ scaling only rescales the scale's gradient
    scale = torch.full((6,), 0.05, requires_grad=True)
    fake_quant(x, scale, 0, -8, 7, axis=1).pow(2).sum().backward()
    g1 = scale.grad.clone()
    scale.grad = None
    fake_quant(x, scale, 0, -8, 7, axis=1, lsq=True).pow(2).sum().backward()
    torch.testing.assert_close(scale.grad, g1 / np.sqrt(4 * 8 * 7), rtol=1e-5, atol=1e-8)


def test_fake_quant_as_a_replacement_changes_the_output_like_an_emitted_qdq():
    """replace={value: fake_quant} on a float graph == the same graph with Q/DQ inserted, run by ORT."""
    W = RNG.normal(size=(8, 5)).astype(np.float32)
    float_g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "f",
                                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 8])],
                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 5])],
                                [numpy_helper.from_array(W, "W")])
    qdq_g = helper.make_graph([helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]),
                               helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"]),
                               helper.make_node("MatMul", ["xd", "W"], ["y"])], "q",
                              list(float_g.input), list(float_g.output),
                              [numpy_helper.from_array(W, "W"), numpy_helper.from_array(np.float32(0.07), "s"),
                               helper.make_tensor("zp", TensorProto.UINT4, [], [8])])
    mk = lambda g: helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)  # noqa: E731
    x = RNG.normal(size=(3, 8)).astype(np.float32)
    want = _session(mk(qdq_g)).run(None, {"x": x})[0]
    module = OnnxModule(mk(float_g))
    lo, hi = grid(4, signed=False)
    got = module.run({"x": torch.from_numpy(x)},
                     replace={"x": lambda v: fake_quant(v, torch.tensor(0.07), 8, lo, hi)})["y"]
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=0, atol=1e-5)
    plain = module(x=torch.from_numpy(x))["y"].detach().numpy()
    assert np.abs(plain - want).max() > 1e-3  # the replacement did something


@pytest.mark.parametrize("lo,hi", [(-8, 7), (0, 15)])
@pytest.mark.parametrize("fused", [False, True])
def test_codes_on_a_bound_pass_the_gradient(lo, hi, fused):
    """Clipped STE with the bounds included, whatever torch.clamp does at its bounds: x/s within half a step of
    a bound rounds onto it and still gets gradient 1 and LSQ's round(t) - t; beyond that 0 and the bound."""
    t = torch.tensor([lo - 0.7, lo - 0.3, lo + 0.2, hi - 0.3, hi + 0.3, hi + 0.7])
    x = (t * 0.1).requires_grad_(True)
    s = torch.tensor(0.1, requires_grad=True)
    if fused:
        out = lsq_drop(x, s, torch.zeros(x.shape, dtype=torch.bool), 0, lo, hi)
        g = lsq_grad_factor(x.numel(), hi)
    else:
        out, g = fake_quant(x, s, 0, lo, hi), 1.0
    out.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    v = x.detach() / s.detach()
    ds = torch.round(v) - v
    ds[0], ds[-1] = lo, hi
    torch.testing.assert_close(s.grad / g, ds.sum(), rtol=1e-5, atol=1e-6)


def _composed_lsq_drop(x, scale, keep, zp, lo, hi):
    return torch.where(keep, x, fake_quant(x, scale, zp, lo, hi, lsq=True))


@pytest.mark.parametrize("zp,lo,hi", [(0, -8, 7), (0, 0, 15), (8, 0, 15)])
def test_lsq_drop_has_the_values_and_gradients_of_the_composed_ops(zp, lo, hi):
    """The fused QDrop + LSQ quantizer of reconstruction: the same outputs bit for bit, the same gradients for
    x and the scale (saturated and kept elements included), on its own and under vmap."""
    x0 = torch.from_numpy(RNG.normal(scale=0.6, size=(3, 5, 7)).astype(np.float32))
    keep = torch.from_numpy(RNG.random(size=x0.shape) < 0.5)
    w = torch.from_numpy(RNG.normal(size=x0.shape).astype(np.float32))
    results = {}
    for batched in (False, True):   # under vmap LSQ's gradient factor counts one image's elements
        for fn in (_composed_lsq_drop, lsq_drop):
            x = x0.clone().requires_grad_(True)
            s = torch.tensor(0.05, requires_grad=True)
            if batched:
                out = torch.func.vmap(fn, in_dims=(0, None, 0, None, None, None))(x, s, keep, zp, lo, hi)
            else:
                out = fn(x, s, keep, zp, lo, hi)
            (out * w).sum().backward()
            results.setdefault(batched, []).append((out.detach(), x.grad, s.grad))
    for (ref, gx_ref, gs_ref), (out, gx, gs) in results.values():
        assert (ref != x0).any() and (gx_ref == 0).any()   # some elements are quantized, some saturate
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        torch.testing.assert_close(gx, gx_ref, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(gs, gs_ref, rtol=1e-5, atol=1e-9)


def test_lsq_drop_refuses_a_per_channel_scale():
    with pytest.raises(ValueError, match="per-tensor"):
        lsq_drop(torch.zeros(2, 3), torch.ones(3), torch.zeros(2, 3, dtype=torch.bool))


def test_tf32_switch_sets_both_backends_and_restores_them():
    """ReconConfig.tf32 (GPU reconstruction steps) and the torch runtime's IEEE float32 share this switch."""
    from carsam_onnx.torchexec.precision import tf32

    flags = lambda: (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)  # noqa: E731
    saved = flags()
    try:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = False, True
        with tf32(True):
            assert flags() == (True, True)
        assert flags() == (False, True)
        with pytest.raises(RuntimeError), tf32(False):
            assert flags() == (False, False)
            raise RuntimeError
        assert flags() == (False, True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
