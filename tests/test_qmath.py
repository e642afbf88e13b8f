"""qmath (numpy, used for emission) and torchexec.fakequant (torch, used in calibration and the executor) compute
the same integer codes and the same dequantized values, bit for bit, on every grid the project writes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from carsam_onnx import qmath
from carsam_onnx.torchexec import fakequant

SHAPE = (12, 40)          # 12 output channels (axis 0), 40 input channels: blocks of 16 -> 3 blocks, last partial


def _case(bits: int, signed: bool, granularity: str, seed: int):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(SHAPE) * rng.uniform(0.1, 3.0, size=(SHAPE[0], 1))).astype(np.float32)
    qmin, qmax = qmath.grid(bits, signed)
    axis, block = 0, None
    if granularity == "tensor":
        scale = qmath.symmetric_scale(np.abs(x).max(), bits).reshape(())
    elif granularity == "channel":
        scale = qmath.symmetric_scale(qmath.weight_absmax(x, axis), bits)
    else:
        block = 16
        scale = qmath.symmetric_scale(qmath.weight_absmax(x, axis, block), bits)
    zp = 0 if signed else int(rng.integers(qmin, qmax + 1))
    # values on exact .5 ties of the grid, where round-half-to-even decides
    s_full = qmath.expand_scale(scale, SHAPE, axis, block)
    x[:, :6] = ((np.arange(6) - 3 + 0.5) * s_full[:, :6]).astype(np.float32)
    x[0, 6] = 0.0
    return x, scale, s_full, zp, qmin, qmax, axis, block


@pytest.mark.parametrize("granularity", ["tensor", "channel", "blocked"])
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("bits", range(2, 9))
def test_numpy_and_torch_give_identical_codes_and_values(bits, signed, granularity):
    for seed in range(3):
        x, scale, s_full, zp, qmin, qmax, axis, block = _case(bits, signed, granularity, seed)
        q_np = qmath.quantize(x, s_full, zp, qmin, qmax)
        dq_np = qmath.dequantize(q_np, s_full, zp)

        xt, st = torch.from_numpy(x), torch.from_numpy(np.asarray(scale, dtype=np.float32))
        # torch takes ONNX's axis: the channel axis per channel, the blocked axis for blocks
        t_axis = qmath.block_axis(x.ndim, axis) if block else axis
        s_b = fakequant.broadcast_qparam(st, xt.shape, t_axis, block or 0)
        q_t = fakequant.quantize(xt, s_b, zp, qmin, qmax)
        dq_t = fakequant.dequantize(q_t, s_b, zp)
        fq_t = fakequant.fake_quant(xt, st, zp, qmin, qmax, axis=t_axis, block_size=block or 0)

        assert np.array_equal(q_np, q_t.numpy()), (bits, signed, granularity, seed)
        assert np.array_equal(dq_np, dq_t.numpy())
        assert np.array_equal(dq_np, fq_t.numpy())
        assert q_np.min() >= qmin and q_np.max() <= qmax
        # the codes are not trivial: the grid is used, and ties went to even
        assert len(np.unique(q_np)) >= min(qmax - qmin + 1, 3)
        r = x[:, :6] / s_full[:, :6]
        tie = r - np.floor(r) == 0.5
        assert tie.sum() > 10 and np.all(np.rint(r[tie]) % 2 == 0)


def test_weight_and_activation_records_match_torch():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 32)).astype(np.float32)
    for bits in (3, 4, 8):
        wq = qmath.weight_quant_from_minmax(w, 0, bits, block_size=16)
        q = qmath.quantize_weight(w, wq)
        t = fakequant.fake_quant(torch.from_numpy(w), torch.from_numpy(wq.scale), 0, wq.qmin, wq.qmax,
                                 axis=1, block_size=16)
        assert np.array_equal(qmath.dequantize_weight(q, wq), t.numpy())
    x = (rng.standard_normal(1000) * 2 + 0.7).astype(np.float32)
    for bits, sym in ((2, False), (4, True), (8, False)):
        aq = qmath.activation_quant_from_range(float(x.min()), float(x.max()), bits, sym)
        t = fakequant.fake_quant(torch.from_numpy(x), torch.tensor(aq.scale, dtype=torch.float32),
                                 float(aq.zero_point), aq.qmin, aq.qmax)
        assert np.array_equal(qmath.fake_quant_activation(x, aq), t.numpy())
        if bits >= 4:   # min/max grids on a Gaussian: ~6 dB a bit less the wide range (4 bits: ~18 dB, 8 bits: ~42 dB)
            assert qmath.sqnr_db(x, t.numpy()) > 6.0 * bits - 12
