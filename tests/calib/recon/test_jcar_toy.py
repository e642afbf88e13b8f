"""JCAR on a two-branch toy: branch B reads branch A's updated stream (as SAM's image->token attention reads the
tokens that token->image attention updated). Learning both together (one joint unit, one loss over both outputs)
must end lower than unit-by-unit reconstruction (A finished first, then B) for the same number of steps."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import helper
from onnx_graphs import float_input, make_model

from carsam_onnx.calib.baseline import calibrate_baseline
from carsam_onnx.calib.recon import find_units
from carsam_onnx.calib.recon.loop import reconstruct
from carsam_onnx.config import BitWidths, QuantConfig, ReconConfig
from carsam_onnx.passes.emit import emit_qdq, target_options
from carsam_onnx.passes.plan import plan_quantization
from carsam_onnx.passes.units import join_units

N, D, H = 24, 16, 32
ITERS = 150          # per unit; the joint unit gets 2 x ITERS
# Unit-by-unit's held-out loss over the joint one's (both outputs summed, emitted ONNX in ONNX Runtime) must be at
# least this. Measured 2026-12-02 at W3A8, 150 steps per unit: MSE init 7.61, unit by unit 7.43, joint 6.42 (1.16x);
# at W3A4 14.77 / 14.79 / 13.79 (1.07x: the 4-bit activation grid dominates there).
MIN_GAIN = 1.08


def _toy():
    rng = np.random.default_rng(0)

    def w(i, o):
        return (rng.standard_normal((i, o)) / np.sqrt(i)).astype(np.float32)

    def b(o):
        return (0.1 * rng.standard_normal(o)).astype(np.float32)

    nodes = [helper.make_node("Mul", ["t", "x"], ["u"], name="a_mix"),
             helper.make_node("MatMul", ["u", "w1"], ["h0"], name="a_fc1"),
             helper.make_node("Add", ["h0", "b1"], ["h1"], name="a_fc1_bias"),
             helper.make_node("Relu", ["h1"], ["h2"], name="a_act"),
             helper.make_node("MatMul", ["h2", "w2"], ["ya0"], name="a_fc2"),
             helper.make_node("Add", ["ya0", "b2"], ["ya"], name="a_fc2_bias"),
             helper.make_node("Add", ["t", "ya"], ["t2"], name="a_residual"),
             helper.make_node("Mul", ["x", "t2"], ["v"], name="b_mix"),
             helper.make_node("MatMul", ["v", "w3"], ["g0"], name="b_fc1"),
             helper.make_node("Add", ["g0", "b3"], ["g1"], name="b_fc1_bias"),
             helper.make_node("Relu", ["g1"], ["g2"], name="b_act"),
             helper.make_node("MatMul", ["g2", "w4"], ["yb0"], name="b_fc2"),
             helper.make_node("Add", ["yb0", "b4"], ["yb"], name="b_fc2_bias"),
             helper.make_node("Add", ["x", "yb"], ["x2"], name="b_residual")]
    inits = {"w1": w(D, H), "b1": b(H), "w2": w(H, D), "b2": b(D), "w3": w(D, H), "b3": b(H), "w4": w(H, D), "b4": b(D)}
    return make_model(nodes, [float_input("t", [N, D]), float_input("x", [N, D])],
                      [float_input("t2", [N, D]), float_input("x2", [N, D])], inits)


def _feeds(n, seed):
    """x weighs a few channels of the token stream heavily in branch B: there A's error matters most, which only
    a loss that sees B can tell A."""
    rng = np.random.default_rng(seed)
    gain = np.full(D, 0.25, np.float32)
    gain[:4] = 4.0
    return [{"t": rng.standard_normal((N, D)).astype(np.float32),
             "x": (gain * (1.0 + 0.3 * rng.standard_normal((N, D)))).astype(np.float32)} for _ in range(n)]


def _joint_loss(model, plan, cfg, art, feeds) -> float:
    """The emitted Q/DQ model in ONNX Runtime against FP: squared error of both branch outputs (t2 - t = ya,
    x2 - x = yb), summed over channels, mean over tokens, summed over the two outputs, mean over feeds."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    fp = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    q = ort.InferenceSession(emit_qdq(model, plan, art, **target_options(cfg)).SerializeToString(), so,
                             providers=["CPUExecutionProvider"])
    total = 0.0
    for f in feeds:
        for a, b in zip(fp.run(None, f), q.run(None, f)):
            total += float(((a - b) ** 2).sum(-1).mean())
    return total / len(feeds)


def test_joint_reconstruction_ends_lower_than_unit_by_unit():
    model = _toy()
    cfg = QuantConfig(bits=BitWidths(3, 8), method="recon", num_calib=16, seed=3,
                      recon=ReconConfig(iters=ITERS, round_lr=1e-3, scale_lr=4e-5))   # the published rates
    plan = plan_quantization(model, cfg)
    calib, held = _feeds(16, 1), _feeds(16, 2)
    base = calibrate_baseline(model, plan, QuantConfig(bits=cfg.bits, method="mse"), calib)
    units = find_units(model, plan)
    assert [u.kind for u in units] == ["mlp", "mlp"]
    joint = join_units(model, units, "joint_toy", None)
    assert joint.inputs == ("u",) or set(joint.inputs) >= {"u"}
    assert [v for v, _ in joint.losses] == ["ya", "yb"]

    seq, _ = reconstruct(model, plan, base, cfg, calib, units, progress=False)
    jnt, _ = reconstruct(model, plan, base, cfg, calib, [joint], progress=False)
    assert jnt.units[0].iters == 2 * ITERS and sum(u.iters for u in seq.units) == 2 * ITERS
    loss_seq = _joint_loss(model, plan, cfg, seq.artifact, held)
    loss_jnt = _joint_loss(model, plan, cfg, jnt.artifact, held)
    loss_base = _joint_loss(model, plan, cfg, base, held)
    assert loss_jnt < loss_seq < loss_base
    assert loss_seq / loss_jnt >= MIN_GAIN, f"held-out joint loss: base {loss_base:.4g}, unit-by-unit " \
        f"{loss_seq:.4g}, joint {loss_jnt:.4g}"
