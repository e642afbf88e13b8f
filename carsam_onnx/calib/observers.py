"""Range observers for activation calibration: MinMax, Percentile, MSE.

Each observer sees the tensors flowing through one ONNX value over the calibration set and returns a
(lo, hi) real range; `qmath.activation_quant_from_range` turns it into scale and zero point.
Percentile and MSE keep the exact min/max plus a bounded uniform random subsample of the values, so
memory stays fixed however large the activations (vit_h encoder blocks) and however many images.
"""
from __future__ import annotations

import math

import torch

from ..qmath import MIN_SCALE, grid
from ..torchexec.fakequant import fake_quant, fake_quant_values

SAMPLE_PER_BATCH = 1 << 16
SAMPLE_CAP = 1 << 21


class MinMaxObserver:
    def __init__(self):
        self.lo = math.inf
        self.hi = -math.inf
        self.nonfinite = False

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach()
        lo, hi = torch.aminmax(x)          # one pass; NaN and inf propagate into these two, so they tell
        self.last_finite = bool(torch.isfinite(lo) & torch.isfinite(hi))  # whether the tensor is all finite
        if not self.last_finite:
            self.nonfinite = True
            x = x[torch.isfinite(x)]
            if x.numel() == 0:
                return
            lo, hi = x.min(), x.max()
        self.lo = min(self.lo, float(lo))
        self.hi = max(self.hi, float(hi))

    @property
    def seen(self) -> bool:
        return self.lo <= self.hi

    def range(self, bits: int, symmetric: bool) -> tuple[float, float]:
        return self.lo, self.hi


class _SampledObserver(MinMaxObserver):
    def __init__(self, seed: int = 0):
        super().__init__()
        self.samples: list[torch.Tensor] = []
        self.count = 0
        self.gen = torch.Generator().manual_seed(seed)

    def observe(self, x: torch.Tensor) -> None:
        super().observe(x)
        flat = x.detach().reshape(-1)
        if not self.last_finite:           # masking copies the tensor: only when something is to be dropped
            flat = flat[torch.isfinite(flat)]
        if flat.numel() > SAMPLE_PER_BATCH:
            idx = torch.randint(0, flat.numel(), (SAMPLE_PER_BATCH,), generator=self.gen).to(flat.device)
            flat = flat[idx]
        self.samples.append(flat.float().cpu())
        self.count += flat.numel()
        if self.count > 2 * SAMPLE_CAP:   # keep the pool bounded: uniform thinning
            pool = torch.cat(self.samples)
            keep = torch.randperm(pool.numel(), generator=self.gen)[:SAMPLE_CAP]
            self.samples, self.count = [pool[keep]], SAMPLE_CAP

    def pool(self) -> torch.Tensor:
        return torch.cat(self.samples) if self.samples else torch.zeros(1)


class PercentileObserver(_SampledObserver):
    """Clip to the p-th percentile at the top and (100-p)-th at the bottom."""

    def __init__(self, percentile: float = 99.99, seed: int = 0):
        super().__init__(seed)
        self.percentile = percentile

    def range(self, bits: int, symmetric: bool) -> tuple[float, float]:
        pool = self.pool()
        q = torch.tensor([1 - self.percentile / 100, self.percentile / 100], dtype=pool.dtype)
        lo, hi = torch.quantile(pool, q).tolist()
        if symmetric:
            m = float(torch.quantile(pool.abs(), q[1]))
            return -m, m
        return min(lo, 0.0), max(hi, 0.0)


def fake_quant_error(x: torch.Tensor, lo: float, hi: float, bits: int, symmetric: bool) -> float:
    """Mean squared error of quantizing x to a `bits` grid spanning [lo, hi] (a search candidate: the scale is
    not rounded to float32 here, the chosen range is turned into the emitted one by qmath)."""
    qmin, qmax = grid(bits, symmetric)
    if symmetric:
        scale, zp = max(abs(lo), abs(hi), MIN_SCALE) / qmax, 0.0
    else:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        scale = max(hi - lo, MIN_SCALE) / qmax
        zp = float(min(max(round(-lo / scale), qmin), qmax))
    s = torch.tensor(scale, dtype=x.dtype, device=x.device)
    return float(fake_quant_values(x, s, zp, qmin, qmax).sub_(x).square_().mean())   # in place: one buffer


class MSEObserver(_SampledObserver):
    """Search the clipping range minimising the quantization MSE on the sampled values.

    Candidates shrink the min/max range by factors in [0.2, 1] (both ends independently for
    asymmetric grids), the standard scale search of PTQ toolkits."""

    def __init__(self, steps: int = 40, seed: int = 0, device: str = "cpu"):
        super().__init__(seed)
        self.steps = steps
        self.device = device   # where the search runs: the samples stay on the host, one site's pool moves over

    def range(self, bits: int, symmetric: bool) -> tuple[float, float]:
        pool = self.pool().to(self.device)
        lo, hi = min(self.lo, 0.0), max(self.hi, 0.0)
        factors = torch.linspace(0.2, 1.0, self.steps).tolist()
        if symmetric:
            m = max(abs(lo), abs(hi))
            best = min(factors, key=lambda f: fake_quant_error(pool, -f * m, f * m, bits, True))
            return -best * m, best * m
        best_hi = min(factors, key=lambda f: fake_quant_error(pool, lo, f * hi, bits, False))
        best_lo = min(factors, key=lambda f: fake_quant_error(pool, f * lo, best_hi * hi, bits, False))
        return best_lo * lo, best_hi * hi


OBSERVERS = {
    "minmax": lambda percentile, seed, device: MinMaxObserver(),
    "percentile": lambda percentile, seed, device: PercentileObserver(percentile, seed),
    "mse": lambda percentile, seed, device: MSEObserver(seed=seed, device=device),
}


def make_observer(method: str, percentile: float = 99.99, seed: int = 0, device: str = "cpu"):
    """`device`: where MSE's range search runs (80 fake-quantizations of up to 4 M samples per site: on a GPU
    calibration, the host's share of the run otherwise)."""
    if method not in OBSERVERS:
        raise ValueError(f"no observer for method {method!r}")
    return OBSERVERS[method](percentile, seed, str(device))


def weight_channel_absmax(w: torch.Tensor, axis: int, method: str, bits: int, steps: int = 40) -> torch.Tensor:
    """Per-output-channel symmetric clipping value for a weight: absmax, or MSE-searched for `mse`."""
    wc = w.detach().movedim(axis, 0).reshape(w.shape[axis], -1).float()
    absmax = wc.abs().amax(dim=1).clamp_min(MIN_SCALE)
    if method != "mse":
        return absmax
    qmin, qmax = grid(bits, True)
    best = absmax.clone()
    best_err = torch.full_like(absmax, math.inf)
    for f in torch.linspace(0.3, 1.0, steps):
        m = absmax * f
        s = (m / qmax)[:, None]
        err = ((fake_quant(wc, s, 0, qmin, qmax) - wc) ** 2).mean(dim=1)
        better = err < best_err
        best = torch.where(better, m, best)
        best_err = torch.where(better, err, best_err)
    return best
