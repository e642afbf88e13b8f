"""calib/observers.py: the MSE range search finds the clipping a brute-force scan finds, and runs on the device it is
given (a GPU calibration searches there; the samples stay on the host)."""
from __future__ import annotations

import pytest
import torch

from carsam_onnx.calib.observers import fake_quant_error, make_observer, weight_channel_absmax


def _heavy_tailed(n=200_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    x[:50] *= 10.0                             # a few outliers: the best 4-bit range clips them
    return x


def test_mse_search_clips_outliers_and_beats_minmax():
    x = _heavy_tailed()
    obs = make_observer("mse", seed=0)
    obs.observe(x)
    lo, hi = obs.range(4, False)
    assert hi < 0.5 * float(x.max()) and lo > 0.5 * float(x.min())   # measured: +-4.4 of +-22
    # measured 0.039 against min-max's 0.633: the 50 clipped outliers cost less than the coarse grid everywhere
    assert fake_quant_error(x, lo, hi, 4, False) < 0.2 * fake_quant_error(x, float(x.min()), float(x.max()), 4, False)


def test_observer_device_reaches_the_search():
    assert make_observer("mse", device="cpu").device == "cpu"
    assert make_observer("mse", device=torch.device("cpu")).device == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mse_search_on_cuda_matches_cpu():
    x = _heavy_tailed()
    ranges = {}
    for dev in ("cpu", "cuda"):
        obs = make_observer("mse", seed=0, device=dev)
        obs.observe(x)
        ranges[dev] = obs.range(4, False)
    assert ranges["cuda"] == pytest.approx(ranges["cpu"], rel=1e-5)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(weight_channel_absmax(w.cuda(), 0, "mse", 4).cpu(), weight_channel_absmax(w, 0, "mse", 4))


@pytest.mark.parametrize("bits,symmetric", [(4, False), (4, True), (8, False), (3, True)])
def test_search_error_is_fake_quant_error_to_the_bit(bits, symmetric):
    """The MSE search's in-place error computes fake_quant's arithmetic op for op: the same float, every time."""
    from carsam_onnx.qmath import MIN_SCALE, grid
    from carsam_onnx.torchexec.fakequant import fake_quant

    x = torch.cat([torch.randn(50_000, generator=torch.Generator().manual_seed(0)) * 0.7, torch.tensor([6.0, -3.0])])
    qmin, qmax = grid(bits, symmetric)
    for f in torch.linspace(0.2, 1.0, 9).tolist():
        lo, hi = f * float(x.min()), f * float(x.max())
        if symmetric:
            scale, zp = max(abs(lo), abs(hi), MIN_SCALE) / qmax, 0.0
        else:
            scale = max(hi - lo, MIN_SCALE) / qmax
            zp = float(min(max(round(-lo / scale), qmin), qmax))
        s = torch.tensor(scale, dtype=x.dtype)
        want = float((fake_quant(x, s, zp, qmin, qmax) - x).pow(2).mean())
        assert fake_quant_error(x, lo, hi, bits, symmetric) == want
