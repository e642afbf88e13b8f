"""Block reconstruction on a two-layer toy unit (x -> Linear -> ReLU -> Linear): AdaRound + LSQ beat nearest
rounding, QDrop mixing happens only while a unit learns, the artifact carries what was learned into the emitted
ONNX, and the same seed gives the same bytes."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnxruntime as ort
import torch
from onnx import helper
from onnx_graphs import float_input, make_model

from carsam_onnx.calib.baseline import calibrate_baseline
from carsam_onnx.calib.recon import calibrate_recon, find_units
from carsam_onnx.calib.recon.loop import Reconstructor
from carsam_onnx.config import BitWidths, QuantConfig, ReconConfig
from carsam_onnx.passes.emit import emit_qdq, target_options
from carsam_onnx.passes.plan import plan_quantization

TOKENS, DIN, DHID, DOUT = 32, 16, 48, 8
# Improvement factor the test asserts: reconstruction must cut the held-out output MSE of nearest rounding
# (same calibrator scales) at least this much, at W3A6 with 500 steps. Measured 2026-12-02: 0.0870 -> 0.0618
# (1.41x); W4A4 gains less here (1.07-1.17x: the 4-bit activation grid dominates this toy's error).
MIN_FACTOR = 1.25


def _toy():
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((DIN, DHID)) / np.sqrt(DIN)).astype(np.float32)
    w2 = (rng.standard_normal((DHID, DOUT)) / np.sqrt(DHID)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
             helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
             helper.make_node("Relu", ["h1"], ["h2"], name="act"),
             helper.make_node("MatMul", ["h2", "w2"], ["y0"], name="fc2"),
             helper.make_node("Add", ["y0", "b2"], ["y"], name="fc2_bias")]
    inits = {"w1": w1, "b1": (0.1 * rng.standard_normal(DHID)).astype(np.float32), "w2": w2,
             "b2": (0.1 * rng.standard_normal(DOUT)).astype(np.float32)}
    return make_model(nodes, [float_input("x", [TOKENS, DIN])], [float_input("y", [TOKENS, DOUT])], inits)


def _feeds(n, seed):
    rng = np.random.default_rng(seed)
    scale = np.ones(DIN, np.float32)
    scale[:2] = 4.0                                  # two outlier channels, as in transformer activations
    return [{"x": (rng.standard_normal((TOKENS, DIN)) * scale).astype(np.float32)} for _ in range(n)]


def _config(iters=500, **kw):
    """The published rates (the GPU defaults), pinned: these tests are about AdaRound and LSQ, which the CPU
    schedule's defaults (config.ReconConfig) partly turn off."""
    kw = {"round_lr": 1e-3, "scale_lr": 4e-5, **kw}
    return QuantConfig(bits=BitWidths(3, 6), method="recon", num_calib=16, seed=3,
                       recon=ReconConfig(iters=iters, **kw))


def _ort_mse(model, qmodel, feeds):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    fp = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    q = ort.InferenceSession(qmodel.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return float(np.mean([np.mean((fp.run(None, f)[0] - q.run(None, f)[0]) ** 2) for f in feeds]))


def test_toy_is_one_mlp_unit():
    model = _toy()
    units = find_units(model, plan_quantization(model, _config()))
    assert [(u.kind, u.inputs, u.output, u.weights) for u in units] == [("mlp", ("x",), "y", ("w1", "w2"))]
    assert set(units[0].activations) == {"x", "h2"}


def test_recon_beats_nearest_rounding_in_the_emitted_onnx():
    model, cfg = _toy(), _config()
    plan = plan_quantization(model, cfg)
    calib, held = _feeds(16, 1), _feeds(16, 2)
    base = calibrate_baseline(model, plan, replace(cfg, method="mse"), calib)
    art = calibrate_recon(model, plan, cfg, calib)
    assert all(art.weights[w].values is not None for w in ("w1", "w2"))
    assert {v: a.scale for v, a in art.activations.items()} != {v: a.scale for v, a in base.activations.items()}
    opts = target_options(cfg)
    mse_near = _ort_mse(model, emit_qdq(model, plan, base, **opts), held)
    mse_recon = _ort_mse(model, emit_qdq(model, plan, art, **opts), held)
    assert mse_near / mse_recon >= MIN_FACTOR, f"nearest {mse_near:.4g}, recon {mse_recon:.4g}"


def test_drop_mixing_only_while_a_unit_learns():
    model, cfg = _toy(), _config(iters=5)
    plan = plan_quantization(model, cfg)
    calib = _feeds(4, 1)
    base = calibrate_baseline(model, plan, replace(cfg, method="mse"), calib)
    units = find_units(model, plan)
    r = Reconstructor(model, plan, base, cfg, units)
    x = {"x": torch.from_numpy(calib[0]["x"])}

    def run():
        with torch.no_grad():
            return r.module.run(x, replace=r.hooks())["y"]

    before = run()
    assert torch.equal(before, run())                  # not learning: deterministic, fully quantized
    for q in r.aq.values():
        q.start()
    assert not torch.equal(run(), run())               # learning: element-wise drop to float
    r.reconstruct(units[0], calib, 5, False, torch.Generator().manual_seed(0))
    assert all(not q.learning for q in r.aq.values()) and all(not q.learning for q in r.wq.values())
    after = run()
    assert torch.equal(after, run())
    # Finished = exactly the emitted Q/DQ graph's arithmetic (no float leak): compare with ONNX Runtime.
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    qmodel = emit_qdq(model, plan, r.artifact({}), **target_options(cfg))
    sess = ort.InferenceSession(qmodel.SerializeToString(), so, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, calib[0])[0], after.numpy(), rtol=0, atol=1e-5)


def test_same_seed_same_bytes():
    model, cfg = _toy(), _config(iters=30)
    plan = plan_quantization(model, cfg)
    calib = _feeds(4, 1)
    outs = [emit_qdq(model, plan, calibrate_recon(model, plan, cfg, calib), **target_options(cfg)).SerializeToString()
            for _ in range(2)]
    assert outs[0] == outs[1]
    other = emit_qdq(model, plan, calibrate_recon(model, plan, replace(cfg, seed=4), calib), **target_options(cfg))
    assert other.SerializeToString() != outs[0]          # the seed matters (sampling and drop masks)


def test_batched_steps_run_vmapped_and_learn():
    model, cfg = _toy(), _config(iters=200, batch_size=4)
    plan = plan_quantization(model, cfg)
    calib, held = _feeds(16, 1), _feeds(16, 2)
    base = calibrate_baseline(model, plan, replace(cfg, method="mse"), calib)
    units = find_units(model, plan)
    r = Reconstructor(model, plan, base, cfg, units)
    stats = r.reconstruct(units[0], calib, 200, False, torch.Generator().manual_seed(0))
    assert r._vmap_ok == {("mlp", "encoder_mlp"): True}
    assert stats.loss_end < stats.loss_start
    opts = target_options(cfg)
    assert _ort_mse(model, emit_qdq(model, plan, r.artifact({}), **opts), held) < \
        _ort_mse(model, emit_qdq(model, plan, base, **opts), held)


def test_unit_guard_keeps_the_calibrator_where_learning_made_the_unit_worse():
    """A schedule that wrecks the unit (step sizes and roundings driven off by a huge learning rate): the guard
    finds the calibrator's nearest rounding and step sizes reconstruct it better, and the artifact is exactly
    what the reconstructor starts from (AdaRound's initial alpha hard-rounds to nearest). With a sane schedule
    the learned values stay."""
    model = _toy()
    bad = _config(iters=30)
    bad = replace(bad, recon=replace(bad.recon, scale_lr=5.0, round_lr=5.0))
    plan = plan_quantization(model, bad)
    calib = _feeds(8, 1)
    base = calibrate_baseline(model, plan, replace(bad, method="mse"), calib)
    units = find_units(model, plan)
    start = Reconstructor(model, plan, base, bad, units).artifact({})
    r = Reconstructor(model, plan, base, bad, units)
    stats = r.reconstruct(units[0], calib, 30, False, torch.Generator().manual_seed(0))
    learned, init = stats.guard_loss
    assert stats.kept == "init" and init < learned
    art = r.artifact({})
    for w in ("w1", "w2"):
        np.testing.assert_array_equal(art.weights[w].values, start.weights[w].values)
    assert art.activations == start.activations

    good = _config(iters=200, batch_size=4)
    r = Reconstructor(model, plan, base, good, units)
    stats = r.reconstruct(units[0], calib, 200, False, torch.Generator().manual_seed(0))
    assert stats.kept == "learned" and stats.guard_loss[0] <= stats.guard_loss[1]
