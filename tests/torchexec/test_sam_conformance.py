"""The torch executor against ONNX Runtime (fp32, no graph optimisations) on SAM vit_b graphs: decoder
from both exporters, segment-anything's own decoder export, Q/DQ decoders emitted by this project, and
the encoder from both exporters (slow). Criterion: max |torch - ORT| <= 1e-4 * max |ORT| per output."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sam_models import official_decoder_path, sam_onnx_path  # noqa: E402

from carsam_onnx.qmath import sqnr_db  # noqa: E402
from carsam_onnx.torchexec.module import OnnxModule  # noqa: E402

RTOL_OF_SCALE = 1e-4


def _session(model_or_path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    src = str(model_or_path) if isinstance(model_or_path, Path) else model_or_path.SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def decoder_feed(n_points: int, seed: int = 0, official: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    coords = rng.uniform(0, 1024, size=(1, n_points, 2)).astype(np.float32)
    labels = rng.integers(0, 2, size=(1, n_points)).astype(np.float32)
    if n_points >= 2:
        labels[0, -2:] = [2, 3]   # a box
    if n_points >= 3:
        labels[0, 0] = -1         # a padding point
    feed = {"image_embeddings": rng.normal(size=(1, 256, 64, 64)).astype(np.float32),
            "point_coords": coords, "point_labels": labels}
    if official:
        feed.update(mask_input=rng.normal(size=(1, 1, 256, 256)).astype(np.float32),
                    has_mask_input=np.array([1], np.float32), orig_im_size=np.array([1200, 1800], np.float32))
    return feed


def assert_conforms(module: OnnxModule, sess: ort.InferenceSession, feed: dict[str, np.ndarray]) -> dict:
    want = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
    with torch.no_grad():
        got = module(**{k: torch.from_numpy(v) for k, v in feed.items()})
    errs = {}
    for name, w in want.items():
        g = got[name].numpy()
        assert g.shape == w.shape, name
        errs[name] = float(np.abs(g - w).max() / max(np.abs(w).max(), 1e-12))
    assert all(e <= RTOL_OF_SCALE for e in errs.values()), errs
    return errs


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_vit_b_decoder(exporter):
    path = sam_onnx_path("vit_b", "decoder", exporter)
    module, sess = OnnxModule(onnx.load(str(path))), _session(path)
    for n in (2, 5, 2, 1):  # the number of prompt points is dynamic
        assert_conforms(module, sess, decoder_feed(n, seed=n))


def test_official_decoder_export():
    path = official_decoder_path("vit_b")
    module, sess = OnnxModule(onnx.load(str(path))), _session(path)
    for n in (3, 6):
        errs = assert_conforms(module, sess, decoder_feed(n, seed=n, official=True))
    assert set(errs) == {"masks", "iou_predictions", "low_res_masks"}


# ---- Q/DQ models emitted by this project (add a new emitted model to EMITTED) --------------------------

def _emit(model: onnx.ModelProto, bits: str, target: str) -> onnx.ModelProto:
    """The project's planner + emitter with MinMax ranges measured by the executor itself."""
    from onnx import numpy_helper

    from carsam_onnx.artifact import CalibrationArtifact
    from carsam_onnx.config import BitWidths, QuantConfig
    from carsam_onnx import qmath
    from carsam_onnx.passes.emit import emit_qdq, target_options
    from carsam_onnx.passes.plan import plan_quantization

    cfg = QuantConfig(bits=BitWidths.parse(bits), target=target)
    plan = plan_quantization(model, cfg)
    feed = decoder_feed(2, seed=11)
    with torch.no_grad():
        vals = OnnxModule(model).run({k: torch.from_numpy(v) for k, v in feed.items()},
                                     capture=[s.value for s in plan.activations])
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    art = CalibrationArtifact(
        {s.value: qmath.activation_quant_from_range(float(vals[s.value].min()), float(vals[s.value].max()),
                                                cfg.bits.activation, cfg.symmetric_activations)
         for s in plan.activations},
        {s.initializer: qmath.weight_quant_from_minmax(inits[s.initializer], s.axis, cfg.layer_weight_bits)
         for s in plan.weights})
    return emit_qdq(model, plan, art, **target_options(cfg))


EMITTED = [("w8a8", "ort"), ("w4a4", "ort"), ("w4a4", "trt"), ("w4a16", "ort")]


@pytest.fixture(scope="module")
def float_decoder():
    return onnx.load(str(sam_onnx_path("vit_b", "decoder", "dynamo")))


def _ort_values(model: onnx.ModelProto, feed, names: list[str]) -> dict[str, np.ndarray]:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=v) for v in names if v not in have)
    sess = _session(probe)
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))



@pytest.mark.parametrize("bits,target", EMITTED)
def test_emitted_qdq_decoder(float_decoder, bits, target):
    """Run from ORT's values at every activation QuantizeLinear input ("teacher-forced"), the executor
    must meet the fp32 criterion: then every code is the same and only float rounding differs. Running
    free, a value 1 ulp from a rounding tie can flip a code, and the flip moves every later layer, so
    there the two runtimes only agree to a quantization-noise level (checked as SQNR)."""
    qmodel = _emit(float_decoder, bits, target)
    types = {t.data_type for t in qmodel.graph.initializer}
    from carsam_onnx.config import QuantConfig

    w8 = onnx.TensorProto.UINT8 if QuantConfig(target=target).unsigned_weights else onnx.TensorProto.INT8
    assert {"w8a8": w8, "w4a4": onnx.TensorProto.INT4 if target == "ort" else onnx.TensorProto.INT8,
            "w4a16": onnx.TensorProto.INT4}[bits] in types
    inits = {t.name for t in qmodel.graph.initializer}
    q_inputs = [n.input[0] for n in qmodel.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits]
    assert bool(q_inputs) == (bits != "w4a16")
    assert sum(n.op_type == "DequantizeLinear" for n in qmodel.graph.node) > 20
    module = OnnxModule(qmodel)
    outputs = [o.name for o in qmodel.graph.output]
    for n in (2, 4):
        feed = decoder_feed(n, seed=20 + n)
        ort_vals = _ort_values(qmodel, feed, q_inputs)
        given = {k: torch.from_numpy(v) for k, v in feed.items()}
        with torch.no_grad():
            forced = module.run(given, start={v: torch.from_numpy(ort_vals[v]) for v in q_inputs})
            free = module.run(given)
        for o in outputs:
            w = ort_vals[o]
            err = float(np.abs(forced[o].numpy() - w).max() / np.abs(w).max())
            assert err <= RTOL_OF_SCALE, (o, err)
            assert sqnr_db(w, free[o].numpy()) > 30, o


# ---- encoders (vit_b encoder forward: ~20 s in torch and ~10 s in ORT per run on 2 cores) -------------

@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_vit_b_encoder(exporter):
    path = sam_onnx_path("vit_b", "encoder", exporter)
    module, sess = OnnxModule(onnx.load(str(path))), _session(path)
    image = np.random.default_rng(1).normal(size=(1, 3, 1024, 1024)).astype(np.float32)
    assert_conforms(module, sess, {"image": image})


def test_write_back_on_the_decoder_is_what_onnxruntime_runs(float_decoder, tmp_path):
    """Change parameters in torch (as calibration's weight correction does), write them back by name,
    and ORT on the saved file computes what the module computes."""
    module = OnnxModule(float_decoder)
    mm = [n for n in float_decoder.graph.node if n.op_type == "MatMul" and n.input[1] in module.params_by_name]
    changed = [mm[0].input[1], mm[len(mm) // 2].input[1]]
    with torch.no_grad():
        for name in changed:
            p = module.param(name)
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path / "corrected.onnx"
    onnx.save(module.to_model_proto(), str(path))
    feed = decoder_feed(3, seed=5)
    assert_conforms(module, _session(path), feed)
    before = _session(float_decoder).run(["low_res_masks"], feed)[0]
    after = _session(path).run(["low_res_masks"], feed)[0]
    assert np.abs(after - before).max() > 1e-3, "the changed weights must reach the file"
