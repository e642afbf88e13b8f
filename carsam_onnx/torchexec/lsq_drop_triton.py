"""lsq_drop's forward and backward as one Triton kernel each (CUDA tensors; fakequant.lsq_drop dispatches here).

The per-tensor LSQ + QDrop quantizer of reconstruction runs on SAM's largest tensors (a global attention's
probabilities: 8 x 12 x 4096 x 4096 floats per step on vit_b). Composed of torch ops its forward and backward
pass over them about 25 times; here the forward reads x and keep and writes the output (9 bytes an element),
the backward reads x, keep and the gradient and writes the input's gradient and one partial sum of the
scale's gradient per block (13 bytes an element).

The arithmetic is fakequant's, operation by operation: x / s an IEEE division (div_rn, as torch's CUDA
kernels and ONNX Runtime divide), round half to even (from floor, exact for every finite float), the zero
point added and clamped, (q - z) * s. So the forward's values are fake_quant_values' bit for bit; the
gradients are lsq_drop's own, but the scale's gradient is summed in another order (block sums, then their sum:
deterministic, equal up to float rounding).
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

BLOCK = 4096


@triton.jit
def _round_half_even(t):
    f = tl.math.floor(t)
    d = t - f                                   # exact: t and floor(t) lie within 1 of each other
    odd = (f - 2.0 * tl.math.floor(f * 0.5)) != 0.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)


@triton.jit
def _codes(x, s, zero_point, HAS_ZP: tl.constexpr):
    """(t = x / s, r = round(t), r + z): fakequant.quantize before its clamp."""
    t = tl.math.div_rn(x, s)
    r = _round_half_even(t)
    if HAS_ZP:
        qz = r + zero_point
    else:
        qz = r
    return t, r, qz


@triton.jit
def _forward(x_ptr, keep_ptr, scale_ptr, out_ptr, n, zero_point, qmin, qmax, HAS_ZP: tl.constexpr,
             BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0)
    keep = tl.load(keep_ptr + offs, mask=m, other=0) != 0
    s = tl.load(scale_ptr)
    t, r, q = _codes(x, s, zero_point, HAS_ZP)
    q = tl.minimum(tl.maximum(q, qmin), qmax)
    if HAS_ZP:
        q = q - zero_point
    tl.store(out_ptr + offs, tl.where(keep, x, q * s), mask=m)


@triton.jit
def _backward(x_ptr, keep_ptr, grad_ptr, scale_ptr, grad_x_ptr, partial_ptr, n, zero_point, qmin, qmax,
              HAS_ZP: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0)
    keep = tl.load(keep_ptr + offs, mask=m, other=1) != 0
    grad = tl.load(grad_ptr + offs, mask=m, other=0.0)
    s = tl.load(scale_ptr)
    t, r, qz = _codes(x, s, zero_point, HAS_ZP)
    low = qz < qmin
    high = qz > qmax
    ds = tl.where(low, qmin - zero_point, tl.where(high, qmax - zero_point, r - t))
    tl.store(partial_ptr + pid, tl.sum(tl.where(keep, 0.0, grad * ds), axis=0))
    tl.store(grad_x_ptr + offs, tl.where(~keep & (low | high), 0.0, grad), mask=m)


def _grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, BLOCK),)


def _on(x: torch.Tensor):
    """Launch on x's GPU (Triton launches on the current device; `--device cuda:1` need not be it)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def forward(x: torch.Tensor, scale: torch.Tensor, keep: torch.Tensor, zero_point: float, qmin: int,
            qmax: int) -> torch.Tensor:
    x, keep = x.contiguous(), keep.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    if n:
        with _on(x):
            _forward[_grid(n)](x, keep, scale.reshape(1).to(x.dtype), out, n, float(zero_point), float(qmin),
                               float(qmax), HAS_ZP=bool(zero_point), BLOCK=BLOCK)
    return out


def backward(grad: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, keep: torch.Tensor, zero_point: float,
             qmin: int, qmax: int, g: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(gradient of x, gradient of the scale shaped like it)."""
    x, keep, grad = x.contiguous(), keep.contiguous(), grad.contiguous()
    n = x.numel()
    grad_x = torch.empty_like(x)
    partial = torch.zeros(max(_grid(n)[0], 1), dtype=torch.float32, device=x.device)
    if n:
        with _on(x):
            _backward[_grid(n)](x, keep, grad, scale.reshape(1).to(x.dtype), grad_x, partial, n, float(zero_point),
                                float(qmin), float(qmax), HAS_ZP=bool(zero_point), BLOCK=BLOCK)
    return grad_x, (partial.sum() * g).to(scale.dtype).reshape(scale.shape)
