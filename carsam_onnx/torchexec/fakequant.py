"""The torch mirror of qmath.py: fake quantization with straight-through gradients, in the exact arithmetic
of ONNX QuantizeLinear / DequantizeLinear (opset 21): q = clamp(round_half_even(x / scale) + zero_point, qmin, qmax),
x' = (q - zero_point) * scale, with x / scale a true division as in ONNX Runtime's CPU kernels. (In a
deep activation-quantized graph two runtimes still drift apart: a 1-ulp difference of a float value
next to a .5 tie flips a code, which moves every later layer a little.)

Gradients (the choice used everywhere in calibration):
- rounding passes gradients unchanged (straight-through estimator);
- clamping passes them where the rounded code lies in [qmin, qmax], bounds included (clipped STE, `clamp_ste`):
  values that saturate get no gradient with respect to x. The bounds are included explicitly, as in the
  published QDrop / BRECQ code on the torch it was written for: torch.clamp's own gradient at its bounds is not
  a fixed convention (1 up to torch 2.11, 0 in torch 2.14's scalar kernels, and on a CPU it has depended on
  which kernel ran), and at 4 bits a bound is a large share of the codes (every attention probability below
  half a step rounds to code 0);
- with respect to the scale, fake_quant's gradient is round(x/s) - x/s where the code is in range and
  qmin - z or qmax - z outside: the LSQ gradient (Esser et al., 2020). `grad_scale` multiplies it by
  LSQ's g = 1/sqrt(numel * qmax) when asked.

Quantized codes are returned as float tensors holding integers (torch has no 4-bit dtype and
integer tensors carry no gradient).
"""
from __future__ import annotations

import math
import warnings

import torch

from ..errors import first_line
from ..qmath import ONNX_QRANGE

__all__ = ["ONNX_QRANGE", "round_ste", "clamp_ste", "grad_scale", "lsq_grad_factor", "broadcast_qparam", "quantize",
           "dequantize", "fake_quant", "fake_quant_values", "lsq_drop"]


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round-half-to-even (like ONNX) with an identity gradient. Written with detach rather than an
    autograd.Function so that torch.func.vmap can batch it (the torch runtime vmaps prompts on GPUs)."""
    return x + (torch.round(x) - x).detach()


def clamp_ste(q: torch.Tensor, qmin: float, qmax: float) -> torch.Tensor:
    """torch.clamp(q, qmin, qmax) whose gradient is 1 where qmin <= q <= qmax (bounds included) and 0 outside,
    whatever torch.clamp's convention at its bounds (module docstring). The same values bit for bit."""
    c = torch.clamp(q, qmin, qmax)
    if not torch.is_grad_enabled():   # (q.requires_grad reads False under vmap: not a test of need)
        return c
    return torch.where((q >= qmin) & (q <= qmax), q, c.detach())


def grad_scale(t: torch.Tensor, g: float) -> torch.Tensor:
    """The value of `t` with its gradient multiplied by g (LSQ's scale-gradient scaling)."""
    return (t - t * g).detach() + t * g


def lsq_grad_factor(numel: int, qmax: int) -> float:
    return 1.0 / math.sqrt(max(numel, 1) * max(qmax, 1))


def broadcast_qparam(p: torch.Tensor, shape: torch.Size, axis: int = 1, block_size: int = 0) -> torch.Tensor:
    """A scale or zero point shaped to broadcast against a tensor of `shape`: per-tensor (one element),
    per-axis (1-D along `axis`) or blocked (same rank, `block_size` consecutive elements along `axis`
    share one value)."""
    r = len(shape)
    if block_size:
        a = axis + r if axis < 0 else axis
        return p.repeat_interleave(block_size, dim=a).narrow(a, 0, shape[a])
    if p.numel() == 1 and p.dim() <= 1:
        return p.reshape(())
    if p.dim() == 1 and r:
        a = axis + r if axis < 0 else axis
        s = [1] * r
        s[a] = p.shape[0]
        return p.reshape(s)
    return p


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | float, qmin: int,
             qmax: int) -> torch.Tensor:
    """Integer codes (as floats) with STE rounding and clipped-STE saturation. `scale`/`zero_point`
    must already broadcast against x (see broadcast_qparam)."""
    q = round_ste(x / scale)
    if not isinstance(zero_point, (int, float)) or zero_point != 0:
        q = q + zero_point
    return clamp_ste(q, qmin, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | float = 0) -> torch.Tensor:
    if not q.dtype.is_floating_point:
        zp = zero_point.to(torch.int32) if isinstance(zero_point, torch.Tensor) else int(zero_point)
        return (q.to(torch.int32) - zp).to(scale.dtype) * scale
    if isinstance(zero_point, torch.Tensor) or zero_point != 0:
        q = q - zero_point
    return q * scale


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | float = 0, qmin: int = -128,
               qmax: int = 127, *, axis: int = 1, block_size: int = 0, lsq: bool = False) -> torch.Tensor:
    """dequantize(quantize(x)): what a QuantizeLinear -> DequantizeLinear pair computes, differentiable in
    x (clipped STE) and in scale (LSQ gradient). `lsq=True` also scales the scale's gradient by
    1/sqrt(numel * qmax). Use it in OnnxModule.run(replace={value_name: lambda v: fake_quant(v, s, z)})."""
    if lsq:
        scale = grad_scale(scale, lsq_grad_factor(x.numel() // max(scale.numel(), 1), qmax))
    s = broadcast_qparam(scale, x.shape, axis, block_size)
    z = broadcast_qparam(zero_point, x.shape, axis, block_size) if isinstance(zero_point, torch.Tensor) else zero_point
    if isinstance(z, torch.Tensor) and not z.dtype.is_floating_point:
        z = z.to(s.dtype)
    return dequantize(quantize(x, s, z, qmin, qmax), s, z)


def fake_quant_values(x: torch.Tensor, scale: torch.Tensor, zero_point: float = 0, qmin: int = -128,
                      qmax: int = 127) -> torch.Tensor:
    """fake_quant's values (the same operations, so the same floats) without gradients, computed in place in
    one new buffer: for loops that fake-quantize large tensors many times (the MSE range search) and for
    hand-written backward passes. `scale` must broadcast against x; `zero_point` a number."""
    with torch.no_grad():
        t = x / scale
        t.round_()
        if zero_point:
            t.add_(zero_point)
        t.clamp_(qmin, qmax)
        if zero_point:
            t.sub_(zero_point)
        return t.mul_(scale)


def lsq_drop_backward(grad: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, keep: torch.Tensor,
                      zero_point: float, qmin: int, qmax: int, g: float) -> tuple[torch.Tensor, torch.Tensor]:
    """lsq_drop's gradients (of x; of the scale, shaped like it) in torch ops: the CPU path, and the reference
    of the Triton kernels (torchexec/lsq_drop_triton.py)."""
    t = x / scale
    r = torch.round(t)
    qz = r + zero_point if zero_point else r
    low, high = qz < qmin, qz > qmax   # codes on a bound are in range (clamp_ste)
    quantized = ~keep
    # d out / d s: round(t) - t where the code is in range, the bound minus z outside it (LSQ)
    ds = torch.where(low, float(qmin - zero_point), torch.where(high, float(qmax - zero_point), r - t))
    grad_s = (grad * ds).masked_fill_(keep, 0.0).sum() * g
    grad_x = grad.masked_fill(quantized & (low | high), 0.0)   # clipped STE; kept elements pass unchanged
    return grad_x, grad_s.reshape(scale.shape)


FUSED_ON_CUDA = True   # lsq_drop on CUDA float32 tensors through the Triton kernels (False: torch ops, to compare)
_TRITON: list = []


def kernel_mismatch(kernels, device) -> str | None:
    """Why `kernels` (forward and backward as in torchexec.lsq_drop_triton) cannot stand in for lsq_drop's torch
    ops on `device`, or None when they can: on a small tensor with exact ties and saturated codes, for a signed and
    a zero-pointed grid, the forward bit for bit, the input's gradient bit for bit, the scale's to 1e-5."""
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([(torch.arange(-20, 20) + 0.5) * 0.25, torch.randn(5000, generator=gen) * 3]).to(device)
    keep = (torch.rand(x.shape, generator=gen) < 0.5).to(device)
    grad = torch.randn(x.shape, generator=gen).to(device)
    scale = torch.tensor(0.25, device=device)
    try:
        for zp, lo, hi in ((0, -8, 7), (8, 0, 15)):
            want = torch.where(keep, x, fake_quant_values(x, scale, zp, lo, hi))
            if not torch.equal(kernels.forward(x, scale, keep, zp, lo, hi), want):
                return f"forward differs from the torch ops (grid {lo}..{hi}, zero point {zp})"
            gx_ref, gs_ref = lsq_drop_backward(grad, x, scale, keep, zp, lo, hi, 1.0)
            gx, gs = kernels.backward(grad, x, scale, keep, zp, lo, hi, 1.0)
            if not torch.equal(gx, gx_ref) or abs(float(gs) - float(gs_ref)) > 1e-5 * abs(float(gs_ref)) + 1e-6:
                return f"backward differs from the torch ops (grid {lo}..{hi}, zero point {zp})"
    except Exception as e:   # no compiler for this GPU, an older Triton: the torch ops serve
        return f"{type(e).__name__}: {first_line(e, 160)}"
    return None


def _fused(x: torch.Tensor):
    """torchexec.lsq_drop_triton where it serves x (a CUDA float32 tensor; Triton importable and its kernels
    computing what the torch ops compute on this GPU, checked once), else None."""
    if not (FUSED_ON_CUDA and x.is_cuda and x.dtype == torch.float32):
        return None
    if not _TRITON:
        try:
            from . import lsq_drop_triton
        except ImportError:
            lsq_drop_triton = None
        why = None if lsq_drop_triton is None else kernel_mismatch(lsq_drop_triton, x.device)
        if why is not None:
            warnings.warn(f"lsq_drop: the Triton kernels are not used ({why}); torch ops instead", stacklevel=2)
            lsq_drop_triton = None
        _TRITON.append(lsq_drop_triton)
    return _TRITON[0]


class _LsqDrop(torch.autograd.Function):
    """fake_quant(x, s, z, lsq=True) where `keep` is False, x where it is True (QDrop), with the gradients
    autograd derives for that composition, computed in a few passes over x instead of one per elementary op
    (the per-tensor activation quantizers of reconstruction run on SAM's largest tensors: a global attention's
    probabilities are 8 x 12 x 4096 x 4096 floats per step on vit_b). Per-tensor scale only."""

    @staticmethod
    def forward(x, scale, keep, zero_point: float, qmin: int, qmax: int, g: float):
        fused = _fused(x)
        if fused is not None:
            return fused.forward(x, scale, keep, zero_point, qmin, qmax)
        return torch.where(keep, x, fake_quant_values(x, scale, zero_point, qmin, qmax))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, scale, keep, zero_point, qmin, qmax, g = inputs
        ctx.save_for_backward(x, scale, keep)
        ctx.zq = (zero_point, qmin, qmax, g)

    @staticmethod
    def backward(ctx, grad):
        x, scale, keep = ctx.saved_tensors
        fused = _fused(x)
        step = lsq_drop_backward if fused is None else fused.backward
        grad_x, grad_s = step(grad, x, scale, keep, *ctx.zq)
        return grad_x, grad_s, None, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, x, scale, keep, zero_point, qmin, qmax, g):
        """Elementwise in x for a shared (unbatched) scale: the batched tensors go through as they are."""
        if in_dims[1] is not None:
            raise NotImplementedError("lsq_drop: a batched scale")
        xd, kd = in_dims[0], in_dims[2]
        if xd is None:
            x = x.unsqueeze(0).expand(info.batch_size, *x.shape)
        elif xd != 0:
            x = x.movedim(xd, 0)
        if kd is None:
            keep = keep.unsqueeze(0).expand(info.batch_size, *keep.shape)
        elif kd != 0:
            keep = keep.movedim(kd, 0)
        return _LsqDrop.apply(x, scale, keep, zero_point, qmin, qmax, g), 0


def lsq_drop(x: torch.Tensor, scale: torch.Tensor, keep: torch.Tensor, zero_point: float = 0, qmin: int = -128,
             qmax: int = 127) -> torch.Tensor:
    """torch.where(keep, x, fake_quant(x, scale, zero_point, qmin, qmax, lsq=True)) for a per-tensor `scale`
    (a one-element tensor) and a boolean `keep` shaped like x: the same values and the same gradients (up to
    float rounding of the backward pass), in fewer kernels. vmap-able (the scale shared by the batch)."""
    if scale.numel() != 1:
        raise ValueError("lsq_drop: per-tensor scales only")
    g = lsq_grad_factor(x.numel(), qmax)
    return _LsqDrop.apply(x, scale, keep, float(zero_point), qmin, qmax, g)
