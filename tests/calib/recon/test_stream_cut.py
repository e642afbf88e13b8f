"""Captures that resume at the previous capture's frontier (ReconConfig.stream_cut): the same values as runs from
the image, fewer nodes run, and a frontier only where no quantizer behind it can still change."""
from __future__ import annotations

import re
from dataclasses import replace

import onnx
import pytest
import torch
from tiny_sam import tiny_sam_paths

from carsam_onnx.calib.baseline import calibrate_baseline
from carsam_onnx.calib.feeds import build_feeds
from carsam_onnx.calib.recon import calibrate_recon
from carsam_onnx.calib.recon.loop import Reconstructor
from carsam_onnx.config import BitWidths, QuantConfig, ReconConfig
from carsam_onnx.passes.plan import plan_quantization
from carsam_onnx.passes.units import find_units
from carsam_onnx.quantize import calibration_samples


@pytest.fixture(scope="module")
def tiny():
    model = onnx.load(str(tiny_sam_paths()["full"]))
    cfg = QuantConfig(bits=BitWidths(4, 4), method="recon", num_calib=2, recon=ReconConfig(iters=2))
    plan = plan_quantization(model, cfg)
    with pytest.warns(UserWarning):
        calib, _ = calibration_samples(cfg, 128, None, None)
    return model, cfg, plan, build_feeds(model, calib)


def _off(cfg):
    return replace(cfg, recon=replace(cfg.recon, stream_cut=False))


def test_resumed_captures_equal_captures_from_the_image(tiny):
    model, cfg, plan, feeds = tiny
    base = calibrate_baseline(model, plan, QuantConfig(bits=cfg.bits, method="minmax"), feeds)
    units = find_units(model, plan)
    on, off = Reconstructor(model, plan, base, cfg, units), Reconstructor(model, plan, base, _off(cfg), units)
    resumed = 0
    for u in units:
        served = on.captures.frontier.serves(list(u.inputs) + list(u.extra_inputs) + [v for v, _ in u.losses])
        image_side = not u.role.startswith("decoder")
        resumed += served and image_side
        a, b = on.capture(u, feeds), off.capture(u, feeds)
        for xa, xb in zip(a[:3], b[:3]):
            for ya, yb in zip(xa, xb):
                for za, zb in zip(ya, yb):
                    assert torch.equal(za, zb), u.name
        for r in (on, off):   # finish every unit the same way (one step) before the next capture
            torch.manual_seed(0)
            r.reconstruct(u, feeds, 1, False, torch.Generator().manual_seed(0))
    image_units = [u for u in units if not u.role.startswith("decoder")]
    assert resumed == len(image_units) - 1   # every image-side unit after the first resumes
    assert off.captures.frontier is None


def test_no_frontier_behind_a_quantizer_that_can_still_change(tiny):
    model, cfg, plan, feeds = tiny
    base = calibrate_baseline(model, plan, QuantConfig(bits=cfg.bits, method="minmax"), feeds)
    units = find_units(model, plan)
    r = Reconstructor(model, plan, base, cfg, units)
    second = units[1]
    needed = list(second.inputs)
    assert r.captures.frontier.values(needed, r._unsettled()) is None      # units[0] is behind it, not finished
    r.done_acts.update(units[0].activations)
    r.done_weights.update(units[0].weights)
    front = r.captures.frontier.values(needed, r._unsettled())
    assert front and set(needed) <= set(front)
    assert r.captures.frontier.values(list(units[0].inputs), r._unsettled()) is not None   # nothing learnable behind it


def test_recon_writes_the_same_artifact_with_and_without_resumed_captures(tiny):
    model, cfg, plan, feeds = tiny
    a = calibrate_recon(model, plan, cfg, feeds)
    b = calibrate_recon(model, plan, _off(cfg), feeds)
    assert a.activations == b.activations
    assert a.weights.keys() == b.weights.keys()
    assert all((a.weights[k].values == b.weights[k].values).all() if a.weights[k].values is not None
               else b.weights[k].values is None for k in a.weights)


def test_a_cache_that_cannot_fit_the_host_is_refused_at_its_first_image(tiny, monkeypatch):
    """The unit's cached activations for every image, measured on the first, against the memory available:
    refused with the unit and the numbers before the cache grows; accepted where it fits."""
    from carsam_onnx.data import memory
    from carsam_onnx.errors import CalibrationError

    model, cfg, plan, feeds = tiny
    base = calibrate_baseline(model, plan, QuantConfig(bits=cfg.bits, method="minmax"), feeds)
    unit = find_units(model, plan)[0]
    r = Reconstructor(model, plan, base, cfg, [unit])
    q_in, fp_in, fp_out, _ = r.capture(unit, feeds)
    per_image = sum(x.numel() * x.element_size() for lst in (q_in, fp_in, fp_out) for x in lst[0])
    ran = []
    real_run = r.module.run
    monkeypatch.setattr(r.module, "run", lambda *a, **k: ran.append(1) or real_run(*a, **k))
    monkeypatch.setattr(memory, "available_bytes", lambda: 4 * per_image)          # room for the second image
    r.captures.frontier.drop()
    r.capture(unit, feeds)
    monkeypatch.setattr(memory, "available_bytes", lambda: per_image // 2)
    r.captures.frontier.drop()
    ran.clear()
    refused = re.escape(f"reconstruction unit {unit.name}: ") + r".* 2 calibration images .* MiB .* --num-calib"
    with pytest.raises(CalibrationError, match=refused):
        r.capture(unit, feeds)
    assert len(ran) == 2       # the first image's two runs (quantized and float), none of the second


def test_a_gpu_capture_far_beyond_the_device_streams_to_the_host():
    """The rule: measured on the first image, a GPU capture goes to the host image by image only when it would
    take more than STREAM_FACTOR times the share of free memory it may keep; nearer the bound it is gathered on
    the device and placed at the end, as before."""
    from carsam_onnx.calib.recon.capture import STREAM_FACTOR, streams_to_host

    free, fraction = 10 * 2**30, 0.5
    assert not streams_to_host(int(fraction * free), free, fraction)                    # fits: stays
    assert not streams_to_host(int(STREAM_FACTOR * fraction * free), free, fraction)    # near: gathered, then moved
    assert streams_to_host(int(STREAM_FACTOR * fraction * free) + 1, free, fraction)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_streamed_gpu_captures_equal_those_gathered_on_the_device(tiny):
    """With the device's share made tiny, a unit's capture streams to the host image by image; the values are
    those of a capture kept on the GPU, bit for bit (encoder and decoder units, none learned in between)."""
    model, cfg, plan, feeds = tiny
    gpu = replace(cfg, device="cuda")
    base = calibrate_baseline(model, plan, QuantConfig(bits=cfg.bits, method="minmax", device="cuda"), feeds)
    units = find_units(model, plan)
    kept = Reconstructor(model, plan, base, gpu, units)
    streamed = Reconstructor(model, plan, base, replace(gpu, recon=replace(gpu.recon, cache_device_fraction=1e-12)), units)
    for u in units[:2] + units[-2:]:
        a, b = kept.capture(u, feeds), streamed.capture(u, feeds)
        assert a[3].type == "cuda" and b[3].type == "cpu", u.name
        for xa, xb in zip(a[:3], b[:3]):
            for ya, yb in zip(xa, xb):
                for za, zb in zip(ya, yb):
                    assert zb.device.type == "cpu" and torch.equal(za.cpu(), zb), u.name
