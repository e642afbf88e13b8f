"""The Runtime layer: ORT keeps Q/DQ semantics (INT4 blocked weights are not computed at reduced accuracy),
and a registered runtime sees the encoder once per image and all of an image's prompts in one run_many."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_coco import write_coco  # noqa: E402
from tiny_sam import tiny_sam_paths  # noqa: E402

from carsam_onnx.data.coco import load_coco_dataset  # noqa: E402
from carsam_onnx.runtime import ort, registry  # noqa: E402
from carsam_onnx.eval.runner import evaluate  # noqa: E402
from carsam_onnx.runtime import OrtRuntime, Runtime, Session, get_runtime  # noqa: E402


def _int4_matmul(k=64, n=32, block=32, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.integers(-8, 8, (k, n)).astype(np.int8)
    sc = rng.uniform(0.01, 0.05, (k // block, n)).astype(np.float32)
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], axis=0, block_size=block),
             helper.make_node("MatMul", ["x", "w"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, n])],
                          initializer=[helper.make_tensor("wq", TensorProto.INT4, [k, n], q.flatten().tolist()),
                                       numpy_helper.from_array(sc, "ws")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(model)
    return model, q.astype(np.float64) * np.repeat(sc, block, axis=0)


def test_ort_runtime_keeps_int4_qdq_exact():
    """ORT fuses INT4 DQ + MatMul into MatMulNBits; at its default accuracy level the error is ~1e-1 on this
    case (FACTS.md), which would make eval of a W4 model report the runtime's rounding, not the model's."""
    model, w = _int4_matmul()
    x = np.random.default_rng(1).standard_normal((1, 8, 64)).astype(np.float32) * 10
    y = OrtRuntime().session(model, "test").run({"x": x})["y"]
    ref = x.astype(np.float64) @ w
    assert np.abs(y - ref).max() / np.abs(ref).max() < 1e-5


class CountingRuntime(Runtime):
    name = "counting"

    def __init__(self):
        self.inner, self.calls = OrtRuntime(), []

    def session(self, model, what):
        sess, calls = self.inner.session(model, what), self.calls

        class Counting(Session):
            input_names, output_names = sess.input_names, sess.output_names

            def run(self, feeds):
                calls.append((what, "run", 1))
                return sess.run(feeds)

            def run_many(self, feeds):
                calls.append((what, "run_many", len(feeds)))
                return [sess.run(f) for f in feeds]
        return Counting()


def test_registered_runtime_gets_one_encoder_run_and_one_batch_per_image(tmp_path, monkeypatch):
    write_coco(tmp_path / "ds", num_images=3)
    ds = load_coco_dataset(tmp_path / "ds")
    rt = CountingRuntime()
    monkeypatch.setitem(registry.RUNTIMES, "counting", lambda device=None: rt)
    assert get_runtime("counting", device="cuda") is rt
    r = evaluate(tiny_sam_paths()["full"], ds, runtime="counting", progress=False)
    assert r.runtime == "counting" and r.num_instances == 6
    assert rt.calls == [("image part", "run", 1), ("prompt part", "run_many", 2)] * 3


def test_unknown_runtime_lists_the_available_ones():
    from carsam_onnx.errors import InputError
    with pytest.raises(InputError, match="choose one of ort"):
        get_runtime("no-such-runtime")


def test_ort_device_choices():
    import onnxruntime as ort

    from carsam_onnx.errors import InputError
    assert isinstance(get_runtime("ort", "cpu"), OrtRuntime)
    with pytest.raises(InputError, match="--runtime ort takes cpu or cuda"):
        get_runtime("ort", "mps")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed: --device cuda is valid for ORT here")
    with pytest.raises(InputError, match="needs onnxruntime-gpu; or use --runtime torch --device cuda"):
        get_runtime("ort", "cuda")


def test_threads_reach_the_runtime(monkeypatch):
    """`eval --threads N`: ORT's intra-op threads, torch's CPU threads; None keeps each runtime's default; a
    registered runtime whose factory takes no thread count refuses it with one line."""
    import torch

    from carsam_onnx.errors import InputError
    from carsam_onnx.runtime.torch_runtime import TorchRuntime
    assert get_runtime("ort", "cpu", threads=3).threads == 3 and get_runtime("ort").threads is None
    assert get_runtime("ort", provider="cpu", threads=2).threads == 2
    before = torch.get_num_threads()
    try:
        assert isinstance(rt := get_runtime("torch", "cpu", threads=1), TorchRuntime) and rt.threads == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    monkeypatch.setitem(registry.RUNTIMES, "plain", lambda device=None: OrtRuntime())
    assert isinstance(get_runtime("plain"), OrtRuntime)
    with pytest.raises(InputError, match="--threads 2: --runtime plain does not take a thread count"):
        get_runtime("plain", threads=2)
    with pytest.raises(InputError, match="--threads 0: must be >= 1"):
        get_runtime("ort", threads=0)


def test_models_past_the_protobuf_limit_go_through_external_data(tmp_path, monkeypatch):
    """A split vit_h part exceeds 2 GB; the runtime then loads it from a temporary file with external data
    (forced here by lowering the threshold)."""
    write_coco(tmp_path / "ds", num_images=1)
    ref = evaluate(tiny_sam_paths()["full"], tmp_path / "ds", progress=False)  # a dataset folder is accepted too
    monkeypatch.setattr(ort, "EXTERNAL_DATA_THRESHOLD", 0)
    saved = []
    real_save = onnx.save_model
    monkeypatch.setattr(onnx, "save_model", lambda m, p, **kw: (saved.append(kw), real_save(m, p, **kw))[1])
    r = evaluate(tiny_sam_paths()["full"], tmp_path / "ds", progress=False)
    assert len(saved) == 2 and all(kw.get("save_as_external_data") for kw in saved)  # image part + prompt part
    assert r.mIoU == pytest.approx(ref.mIoU, abs=1e-9) and r.num_instances == ref.num_instances == 2


def _biased_qdq_matmul(seed=0, k=16, n=8):
    """Q/DQ(uint4) x -> MatMul(DQ(int8 w)) -> Add(float bias) -> Q/DQ(uint4): the pattern ORT turns into Gemm
    and then (WeightBiasQuantization) rounds the bias to int32 at scale sx * sw."""
    rng = np.random.default_rng(seed)
    wq = rng.integers(-8, 8, (k, n)).astype(np.int8)
    sw, sx, sy = np.float32(0.25), np.float32(0.5), np.float32(4.0)
    bias = rng.uniform(-1, 1, n).astype(np.float32)
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "sw"], ["w"]),
             helper.make_node("MatMul", ["xd", "w"], ["mm"]),
             helper.make_node("Add", ["mm", "bias"], ["y0"]),
             helper.make_node("QuantizeLinear", ["y0", "sy", "z"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "sy", "z"], ["y"])]
    inits = [numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(np.array(sw), "sw"),
             numpy_helper.from_array(np.array(sx), "sx"), numpy_helper.from_array(np.array(sy), "sy"),
             helper.make_tensor("z", TensorProto.UINT4, [], [8]), numpy_helper.from_array(bias, "bias")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, n])], initializer=inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(model)
    x = rng.uniform(-4, 4, (4, k)).astype(np.float32)
    xd = (np.clip(np.round(x / sx) + 8, 0, 15) - 8) * sx
    y0 = xd @ (wq.astype(np.float32) * sw) + bias
    return model, x, (np.clip(np.round(y0 / sy) + 8, 0, 15) - 8) * sy


def test_ort_runtime_does_not_quantize_float_biases():
    """At ORT's default settings this graph's outputs are off by one whole output step (4.0; ORT 1.31)."""
    model, x, ref = _biased_qdq_matmul()
    y = OrtRuntime().session(model, "test").run({"x": x})["y"]
    np.testing.assert_allclose(y, ref, atol=1e-5)


def test_project_session_runs_every_quantized_linear_on_integer_kernels(tmp_path):
    """With ORT's defaults, MatMulAddFusion turns a quantized Linear (DQ(x), DQ(W) -> MatMul -> bias Add) into a
    float Gemm before the QDQ fusions run, so its weight is dequantized at every run; the project's session
    settings (ort_settings.SESSION_CONFIG) leave it to the integer kernels. Tiny SAM, W8A8 MinMax."""
    import collections
    import warnings

    import onnxruntime

    from carsam_onnx.config import BitWidths, QuantConfig
    from carsam_onnx.quantize import quantize
    from carsam_onnx.runtime.ort_settings import session_options

    q = tmp_path / "q.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize(tiny_sam_paths()["full"], q, QuantConfig(bits=BitWidths(8, 8), method="minmax", num_calib=2),
                 progress=False)
    g = onnx.load(str(q)).graph
    dq_out = {o for n in g.node if n.op_type == "DequantizeLinear" for o in n.output}
    quantized = sum(1 for n in g.node if n.op_type == "MatMul" and all(x in dq_out for x in n.input[:2]))

    def optimized_ops(so) -> collections.Counter:
        """Op counts of ORT's optimised graph; "float on DQ": float MatMul / Gemm nodes reading a DequantizeLinear."""
        so.optimized_model_filepath = str(tmp_path / "opt.onnx")
        onnxruntime.InferenceSession(str(q), so, providers=["CPUExecutionProvider"])
        nodes = onnx.load(str(tmp_path / "opt.onnx")).graph.node
        dq = {o for n in nodes if n.op_type == "DequantizeLinear" for o in n.output}
        c = collections.Counter(n.op_type for n in nodes)
        c["float on DQ"] = sum(1 for n in nodes if n.op_type in ("MatMul", "Gemm") and any(x in dq for x in n.input))
        return c

    ours = optimized_ops(session_options())
    plain = onnxruntime.SessionOptions()
    plain.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    default = optimized_ops(plain)
    integer = ours["MatMulIntegerToFloat"] + ours["QLinearMatMul"]
    assert quantized >= 20
    assert default["float on DQ"] > 0                           # what the settings avoid (ORT 1.31)
    assert ours["float on DQ"] == 0 and integer == quantized, (ours, quantized)


def test_extra_config_folds_4bit_weight_dqs_and_drops_8bit_kernels(tmp_path):
    """OrtRuntime(extra_config=...) adds session config entries to ort_settings' (bench_parity --ort-config):
    with session.disable_quant_qdq = 1 ORT folds a W4A4 model's weight DQs into float initializers and keeps
    every activation Q/DQ pair (docs/quantization_format.md, thread count); the default settings keep the weight
    DQs. The same option takes a W8A8 model's integer kernels away, which is why ort_settings leaves it off.
    Tiny SAM, MinMax."""
    import warnings

    import onnxruntime

    from carsam_onnx.config import BitWidths, QuantConfig
    from carsam_onnx.quantize import quantize
    from carsam_onnx.runtime.ort_settings import session_options

    def quantized(bits: int):
        q = tmp_path / f"w{bits}a{bits}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize(tiny_sam_paths()["full"], q, QuantConfig(bits=BitWidths(bits, bits), method="minmax",
                                                              num_calib=2), progress=False)
        return q

    def optimized(q, rt):
        """ORT's optimised graph of q under rt's settings: (weight DQs, i.e. DQ nodes not reading a Q; Q nodes;
        integer MatMul kernels)."""
        so = session_options(extra=rt.extra_config)
        so.optimized_model_filepath = str(tmp_path / "opt.onnx")
        onnxruntime.InferenceSession(str(q), so, providers=["CPUExecutionProvider"])
        nodes = onnx.load(str(tmp_path / "opt.onnx")).graph.node
        q_out = {o for n in nodes if n.op_type == "QuantizeLinear" for o in n.output}
        dqs = [n for n in nodes if n.op_type == "DequantizeLinear"]
        return (sum(n.input[0] not in q_out for n in dqs), sum(n.op_type == "QuantizeLinear" for n in nodes),
                sum(n.op_type in ("MatMulIntegerToFloat", "QLinearMatMul") for n in nodes))

    folded = OrtRuntime(extra_config={"session.disable_quant_qdq": "1"})
    w4 = quantized(4)
    model_q = sum(1 for n in onnx.load(str(w4)).graph.node if n.op_type == "QuantizeLinear")
    assert optimized(w4, OrtRuntime())[0] > 0
    weight_dq, kept_q, _ = optimized(w4, folded)
    assert weight_dq == 0 and kept_q >= model_q, (weight_dq, kept_q, model_q)
    w8 = quantized(8)
    assert optimized(w8, OrtRuntime())[2] >= 20 and optimized(w8, folded)[2] == 0
