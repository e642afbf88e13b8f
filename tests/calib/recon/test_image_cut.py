"""Decoder units of a full model capture from the cached encoder output: the same values as full runs."""
from __future__ import annotations

import onnx
import pytest
from tiny_sam import tiny_sam_paths

from carsam_onnx.config import BitWidths, QuantConfig
from carsam_onnx.passes.plan import plan_quantization
from carsam_onnx.passes.units import find_units


def test_decoder_captures_from_the_cached_encoder_output_equal_full_runs():
    import torch

    from carsam_onnx.calib.baseline import calibrate_baseline
    from carsam_onnx.calib.feeds import build_feeds
    from carsam_onnx.calib.recon.loop import Reconstructor
    from carsam_onnx.config import ReconConfig
    from carsam_onnx.quantize import calibration_samples

    path = tiny_sam_paths()["full"]
    model = onnx.load(str(path))
    cfg = QuantConfig(bits=BitWidths(4, 4), method="recon", num_calib=2, recon=ReconConfig(iters=1))
    plan = plan_quantization(model, cfg)
    with pytest.warns(UserWarning):
        calib, _ = calibration_samples(cfg, 128, None, None)
    feeds = build_feeds(model, calib)
    base = calibrate_baseline(model, plan, QuantConfig(bits=cfg.bits, method="minmax"), feeds)
    units = find_units(model, plan)
    with_cut = Reconstructor(model, plan, base, cfg, units)
    without = Reconstructor(model, plan, base, QuantConfig(bits=cfg.bits, method="recon", recon=ReconConfig(
        iters=1, image_cut=False)), units)
    assert with_cut.captures.cut_plan is not None and without.captures.cut_plan is None
    prompt_side = with_cut.captures.cut_plan[1]
    assert prompt_side == {u.name for u in units if u.role.startswith("decoder")}
    for u in units:
        if u.name in prompt_side:
            a, b = with_cut.capture(u, feeds), without.capture(u, feeds)
            for xa, xb in zip(a[:3], b[:3]):
                for ya, yb in zip(xa, xb):
                    for za, zb in zip(ya if isinstance(ya, list) else [ya], yb if isinstance(yb, list) else [yb]):
                        assert torch.equal(za, zb), u.name
        for r in (with_cut, without):   # finish every unit the same way (one step) before the next capture
            torch.manual_seed(0)
            r.reconstruct(u, feeds, 1, False, torch.Generator().manual_seed(0))
