"""The learnable quantizers of block reconstruction: AdaRound weights, LSQ activations with QDrop.

Each quantizer is in one of two states:
- learning (only while its unit is being reconstructed): AdaRound's soft rounding, LSQ's learnable step size,
  and QDrop: every element keeps its float value with probability `drop_prob`;
- fixed (before its unit starts and after it is finished): exactly what the emitted Q/DQ computes, fully on
  (no drop, hard rounding, the step size as a constant). There is no third state: a finished unit can never
  run half float (the published evaluation bug, shared/RESEARCH.md).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ...artifact import ActivationQuant, WeightQuant
from ...torchexec.fakequant import fake_quant, lsq_drop

ZETA, GAMMA = 1.1, -0.1     # AdaRound's rectified-sigmoid stretch (Nagel et al., 2020)
MIN_SCALE = 1e-12           # the scale floor of passes/bits.py


def _expanded_scale(wq: WeightQuant, shape) -> np.ndarray:
    from ...qmath import expand_scale

    return np.ascontiguousarray(expand_scale(wq.scale, tuple(shape), wq.axis, wq.block_size), dtype=np.float32)


class FixedWeight:
    """A weight quantized once (nearest rounding or given integers), as the emitted DequantizeLinear computes it."""

    def __init__(self, w: np.ndarray, wq: WeightQuant, device):
        from ...qmath import dequantize_weight, quantize_weight

        self.wq = wq
        self.tensor = torch.from_numpy(dequantize_weight(quantize_weight(w, wq), wq)).to(device)

    def __call__(self, _param: torch.Tensor) -> torch.Tensor:
        return self.tensor


class AdaRoundWeight(nn.Module):
    """h(alpha) = clamp(sigmoid(alpha) (zeta - gamma) + gamma, 0, 1); w_q = s * clamp(floor(w/s) + h, qmin, qmax).

    alpha starts where h = frac(w/s) (so the soft weight starts at w, up to clipping); at the end the rounding
    is hard: up where alpha >= 0 (h >= 0.5)."""

    def __init__(self, w: np.ndarray, wq: WeightQuant, device):
        super().__init__()
        self.wq = wq
        s = torch.from_numpy(_expanded_scale(wq, w.shape)).to(device)
        x = torch.from_numpy(np.asarray(w, dtype=np.float32)).to(device) / s
        floor = torch.floor(x)
        rest = (x - floor).clamp(0.0, 1.0 - 1e-6)
        self.register_buffer("s", s)
        self.register_buffer("floor", floor)
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        self.learning = False
        self._hard: torch.Tensor | None = None

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def values(self) -> torch.Tensor:
        """The hard-rounded integers (float tensor holding integers on the grid)."""
        return torch.clamp(self.floor + (self.alpha.detach() >= 0).to(self.floor.dtype), self.wq.qmin, self.wq.qmax)

    def regularizer(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    def start(self) -> None:
        self.learning, self._hard = True, None

    def finish(self) -> None:
        self.learning = False
        self._hard = (self.values() * self.s).detach()

    def __call__(self, _param: torch.Tensor) -> torch.Tensor:
        if self.learning:
            return torch.clamp(self.floor + self.h(), self.wq.qmin, self.wq.qmax) * self.s
        if self._hard is None:
            self._hard = (self.values() * self.s).detach()
        return self._hard

    def weight_quant(self) -> WeightQuant:
        return WeightQuant(scale=self.wq.scale, axis=self.wq.axis, bits=self.wq.bits, block_size=self.wq.block_size,
                           values=self.values().cpu().numpy().astype(np.int8))


class LsqActivation(nn.Module):
    """Per-tensor fake quantization with a learnable step size (LSQ gradient, scaled by 1/sqrt(numel*qmax)) and
    QDrop while learning: each element keeps its float value with probability `drop_prob`."""

    def __init__(self, aq: ActivationQuant, device, drop_prob: float = 0.5):
        super().__init__()
        self.aq = aq
        self.scale = nn.Parameter(torch.tensor(float(aq.scale), dtype=torch.float32, device=device))
        self.zero_point = float(aq.zero_point)
        self.drop_prob = drop_prob
        self.learning = False

    def start(self) -> None:
        self.learning = True

    def finish(self) -> None:
        self.learning = False
        with torch.no_grad():
            self.scale.copy_(torch.tensor(self.activation_quant().scale, dtype=torch.float32))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.learning:
            return fake_quant(x, self.scale.detach(), self.zero_point, self.aq.qmin, self.aq.qmax)
        scale = self.scale.clamp_min(MIN_SCALE)
        if self.drop_prob <= 0:
            return fake_quant(x, scale, self.zero_point, self.aq.qmin, self.aq.qmax, lsq=True)
        keep = torch.rand_like(x) < self.drop_prob
        return lsq_drop(x, scale, keep, self.zero_point, self.aq.qmin, self.aq.qmax)

    def activation_quant(self) -> ActivationQuant:
        s = float(np.float32(max(float(self.scale.detach()), MIN_SCALE)))
        return ActivationQuant(scale=s, zero_point=self.aq.zero_point, bits=self.aq.bits, signed=self.aq.signed)


def beta_at(step: int, iters: int, warmup: float, beta_start: float, beta_end: float) -> float | None:
    """The rounding regulariser's exponent at `step` (None: regulariser off during the warm-up)."""
    start = int(warmup * iters)
    if step < start:
        return None
    rel = (step - start) / max(iters - start, 1)
    return beta_end + (beta_start - beta_end) * max(0.0, 1.0 - rel)


def cosine_lr(base: float, step: int, iters: int) -> float:
    return 0.5 * base * (1 + math.cos(math.pi * min(step, iters) / max(iters, 1)))
