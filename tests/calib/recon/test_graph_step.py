"""The GPU's captured reconstruction step (calib/recon/graph_step.py) computes what the eager step computes.

CUDA graphs need a GPU, which CI does not have: here the step's body (gather from the stacked caches, vmapped
unit, loss, regulariser, backward) runs eagerly on the CPU with QDrop off and is compared with the eager step of
loop.Reconstructor on the same images, loss and every gradient. Capture and replay themselves are exercised on
the device machine (docs/results.md)."""
from __future__ import annotations

import warnings

import onnx
import pytest
import torch
from tiny_sam import tiny_sam_paths

from carsam_onnx.calib.baseline import calibrate_baseline
from carsam_onnx.calib.feeds import build_feeds
from carsam_onnx.calib.recon.graph_step import GraphStep
from carsam_onnx.calib.recon.loop import Reconstructor, batch_order
from carsam_onnx.calib.recon.quantizers import AdaRoundWeight
from carsam_onnx.config import BitWidths, QuantConfig, ReconConfig
from carsam_onnx.passes.plan import plan_quantization
from carsam_onnx.passes.units import find_units, joint_units
from carsam_onnx.quantize import calibration_samples


@pytest.fixture(scope="module")
def setup():
    model = onnx.load(str(tiny_sam_paths()["full"]))
    cfg = QuantConfig(bits=BitWidths(4, 4), method="recon", num_calib=3,
                      recon=ReconConfig(iters=1, batch_size=2, drop_prob=0.0))
    plan = plan_quantization(model, cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calib, _ = calibration_samples(cfg, 128, None, None)
    feeds = build_feeds(model, calib)
    base = calibrate_baseline(model, plan, QuantConfig(bits=cfg.bits, method="minmax"), feeds)
    units = find_units(model, plan)
    return model, plan, base, cfg, feeds, units


@pytest.mark.parametrize("role,pairing", [("encoder_window", None), ("decoder_token_to_image", None),
                                          ("decoder_joint_mlp", "mlp"), ("decoder_joint_layer", "layer")])
def test_graph_step_body_equals_the_eager_step(setup, role, pairing):
    """JCAR's joint units read per-image float values from outside their inputs (the token stream for the
    residual adds, the prompt tokens): batched, they must match per-image runs (before batch_order they were
    shared as if every image had the first one's, failed the check and stepped image by image on the GPU)."""
    model, plan, base, cfg, feeds, units = setup
    if pairing is not None:
        units = joint_units(model, units, pairing)
    unit = next(u for u in units if u.role == role)
    r = Reconstructor(model, plan, base, cfg, units)
    q_in, fp_in, fp_out, where = r.capture(unit, feeds)
    names, n_main, q_in = batch_order(list(unit.inputs) + list(unit.extra_inputs), len(unit.inputs), q_in)
    rounding = [r.wq[w] for w in unit.weights if isinstance(r.wq[w], AdaRoundWeight)]
    acts = [r.aq[v] for v in unit.activations if v in r.aq]
    assert rounding and acts
    for q in rounding + acts:
        q.start()
    hooks = r.hooks()
    axes = [a for _, a in unit.losses]
    assert r._vmap_works(unit, names, n_main, q_in, hooks)
    params = [q.alpha for q in rounding] + [q.scale for q in acts]
    idx, beta = [2, 0], 7.0

    loss_eager = r._eager_step(unit, names, n_main, idx, q_in, fp_in, fp_out, 2, True, hooks, axes, rounding, beta)
    grads_eager = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None

    g = GraphStep(lambda b, sh: r._run_batched(unit, names, n_main, b, sh, hooks), names, n_main, q_in, fp_in,
                  fp_out, axes, rounding, cfg.recon.round_weight, 0.0, 2, "cpu")
    g.all_params = params
    g.idx.copy_(torch.tensor(idx))
    g.beta.fill_(beta)
    g.reg_on.fill_(1.0)
    loss_body = g._body()
    assert torch.allclose(loss_body, loss_eager, rtol=1e-5, atol=1e-7)
    for p, ge in zip(params, grads_eager):
        assert p.grad is not None
        assert torch.allclose(p.grad, ge, rtol=1e-4, atol=1e-8 * float(ge.abs().max()) + 1e-12)

    # Warm-up steps: the regulariser is multiplied by 0 in the graph and skipped in the eager step.
    for p in params:
        p.grad = None
    r._eager_step(unit, names, n_main, idx, q_in, fp_in, fp_out, 2, True, hooks, axes, rounding, None)
    warm_eager = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    g.reg_on.fill_(0.0)
    g._body()
    for p, ge in zip(params, warm_eager):
        assert torch.allclose(p.grad, ge, rtol=1e-4, atol=1e-8 * float(ge.abs().max()) + 1e-12)


def test_cpu_reconstruction_runs_eager_steps(setup):
    model, plan, base, cfg, feeds, units = setup
    r = Reconstructor(model, plan, base, cfg, units[:1])
    stats = r.reconstruct(units[0], feeds, 2, False, torch.Generator().manual_seed(0))
    assert stats.step_mode == "eager"


def test_batch_check_tolerates_a_boundary_flip_and_refuses_shared_images():
    """One activation code of one image landing on the other side of a quantization boundary (batched and
    per-image float arithmetic differ in the last bits) is no batching fault; an image that reads another
    image's values is."""
    from carsam_onnx.calib.recon.loop import batch_agrees

    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 1, 64, 256, generator=g)
    flip = ref.clone()
    flip[1, 0, 3, 7] += 0.05 * float(ref.abs().max())      # one element, a 4-6-bit step of the output's range
    assert float((flip - ref).abs().max()) > 1e-3 * float(ref.abs().max())   # what the old max-element test refused
    assert batch_agrees(flip, ref)
    shared = ref.clone()
    shared[1] = ref[0]                                      # the second image computed from the first one's values
    assert not batch_agrees(shared, ref)
    assert not batch_agrees(ref[:1], ref)
