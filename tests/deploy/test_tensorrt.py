"""deploy/tensorrt.py without TensorRT: the missing-package error, the rule check that runs first, and the
optimization-profile / build-configuration logic. (build_engine itself cannot run on any machine we have.)"""
from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from carsam_onnx.artifact import CalibrationArtifact
from carsam_onnx.deploy.tensorrt import (EngineConfig, build_engine, engine_config, input_dims, shape_profile,
                                         trtexec_command)
from carsam_onnx.errors import CarsamError, InputError, ModelError, OutputError
from carsam_onnx import qmath
from carsam_onnx.passes.emit import emit_qdq
from carsam_onnx.passes.sites import ActivationKind, ActivationSite, QuantPlan, WeightKind, WeightSite

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None


def _qdq_model(symmetric: bool) -> onnx.ModelProto:
    """x[1, num_points, 64] @ W -> y, W8A8 Q/DQ (symmetric: TensorRT-conform; asymmetric: UINT8, not)."""
    W = np.random.default_rng(0).normal(size=(64, 32)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "num_points", 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "num_points", 32])],
                          [numpy_helper.from_array(W, "W")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    plan = QuantPlan((WeightSite("mm", "W", 1, WeightKind.LINEAR),),
                     (ActivationSite("x", ("mm",), ActivationKind.LAYER_INPUT),), ())
    art = CalibrationArtifact({"x": qmath.activation_quant_from_range(-1, 1, 8, symmetric)},
                              {"W": qmath.weight_quant_from_minmax(W, 1, 8)})
    return emit_qdq(model, plan, art)


@pytest.mark.skipif(HAVE_TRT, reason="tensorrt is installed here; the missing-package error cannot be exercised")
def test_missing_tensorrt_is_a_clear_error(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(_qdq_model(symmetric=True), str(src))
    engine = tmp_path / "m.engine"
    with pytest.raises(CarsamError, match="TensorRT is not installed") as e:
        build_engine(src, engine)
    assert "\n" not in str(e.value)
    assert not engine.exists() and list(tmp_path.iterdir()) == [src]


def test_rule_violations_are_refused_before_tensorrt_is_needed(tmp_path):
    src = tmp_path / "asym.onnx"
    onnx.save(_qdq_model(symmetric=False), str(src))
    with pytest.raises(ModelError, match=r"has 4 TensorRT Q/DQ rule violations .*quantized-type"):
        build_engine(src, tmp_path / "e.engine")


def test_existing_engine_is_not_overwritten_without_force(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(_qdq_model(symmetric=True), str(src))
    (tmp_path / "e.engine").write_bytes(b"old")
    with pytest.raises(OutputError, match="exists"):
        build_engine(src, tmp_path / "e.engine")
    assert (tmp_path / "e.engine").read_bytes() == b"old"


def test_profile_of_the_sam_decoder_exports():
    from sam_models import sam_onnx_path
    for exporter in ("dynamo", "torchscript"):
        model = onnx.load(str(sam_onnx_path("vit_b", "decoder", exporter)), load_external_data=False)
        dims = input_dims(model)
        assert dims["image_embeddings"] == (1, 256, 64, 64)
        prof = shape_profile(dims)
        assert set(prof) == {"point_coords", "point_labels"}, exporter
        assert prof["point_coords"] == ((1, 1, 2), (1, 2, 2), (1, 16, 2))
        assert prof["point_labels"] == ((1, 1), (1, 2), (1, 16))
        wide = shape_profile(dims, {"num_points": (2, 5, 64)})
        assert wide["point_coords"] == ((1, 2, 2), (1, 5, 2), (1, 64, 2))


def test_profile_rules():
    assert shape_profile({"image": (1, 3, 1024, 1024)}) == {}                   # static: no profile entry
    assert shape_profile({"point_labels": (1, None)})["point_labels"] == ((1, 1), (1, 2), (1, 16))  # unnamed
    with pytest.raises(InputError, match="batch"):
        shape_profile({"image": ("batch", 3, 1024, 1024)})
    assert shape_profile({"image": ("batch", 3, 8, 8)}, {"batch": (1, 4, 8)})["image"][2] == (8, 3, 8, 8)
    for bad in ((0, 1, 2), (3, 2, 4), (1, 2)):
        with pytest.raises(InputError):
            shape_profile({"x": ("n",)}, {"n": bad})


def test_engine_config_and_trtexec_command():
    model = _qdq_model(symmetric=True)
    cfg = engine_config(model, workspace_gb=2)
    assert cfg == EngineConfig(True, False, False, 2 << 30, {"x": ((1, 1, 64), (1, 2, 64), (1, 16, 64))})
    cmd = trtexec_command("m.onnx", "m.engine", cfg)
    assert cmd[:3] == ["trtexec", "--onnx=m.onnx", "--saveEngine=m.engine"]
    assert "--stronglyTyped" in cmd and "--memPoolSize=workspace:2048M" in cmd
    assert "--minShapes=x:1x1x64" in cmd and "--optShapes=x:1x2x64" in cmd and "--maxShapes=x:1x16x64" in cmd
    assert not any(f in cmd for f in ("--fp16", "--int8"))
    weak = engine_config(model, strongly_typed=False, fp16=True, int8=True)
    weak_cmd = trtexec_command("a", "b", weak)
    assert {"--fp16", "--int8"} <= set(weak_cmd) and "--stronglyTyped" not in weak_cmd
    with pytest.raises(InputError, match="strongly typed"):
        engine_config(model, fp16=True)
    with pytest.raises(InputError, match="workspace"):
        engine_config(model, workspace_gb=0)
