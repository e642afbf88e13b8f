"""Integer grids, scale / zero-point math and INT4 packing shared by passes and calibrators (numpy only).

Grids (docs/quantization_format.md):
- weights: symmetric, zero point 0, integers in [-2^(b-1), 2^(b-1)-1], scale per output channel (or per block
  of `block_size` input channels); stored in INT4 for b <= 4, INT8 for 5 <= b <= 8;
- activations: per tensor; unsigned grid [0, 2^b-1] with a zero point (asymmetric, target ort) or signed grid
  [-2^(b-1), 2^(b-1)-1] with zero point 0 (symmetric, target trt); container UINT4/INT4 for b <= 4, else
  UINT8/INT8. A grid narrower than its container (b = 2, 3, 5, 6, 7) is enforced by a Clip before the Q.
Rounding is round-half-to-even everywhere (np.rint), as in ONNX QuantizeLinear and TensorRT.
"""
from __future__ import annotations

import math

import numpy as np

from ..artifact import ActivationQuant, WeightQuant
from ..errors import CalibrationError, InputError

MIN_BITS, MAX_BITS = 2, 8
FLOAT_BITS = 16            # "a16": activations stay float
MIN_SCALE = 1e-12          # floor for scales of all-zero (or denormal) channels / tensors


def check_bits(bits: int, what: str = "bit-width") -> int:
    if not isinstance(bits, (int, np.integer)) or not MIN_BITS <= int(bits) <= MAX_BITS:
        raise InputError(f"{what} {bits!r} is not supported: use an integer from {MIN_BITS} to {MAX_BITS}")
    return int(bits)


def container_bits(bits: int) -> int:
    """Storage width for a `bits`-wide grid: 4 (INT4/UINT4) for bits <= 4, else 8 (INT8/UINT8)."""
    return 4 if check_bits(bits) <= 4 else 8


def grid(bits: int, signed: bool) -> tuple[int, int]:
    """(qmin, qmax) of a `bits`-wide integer grid."""
    b = check_bits(bits)
    return (-(1 << (b - 1)), (1 << (b - 1)) - 1) if signed else (0, (1 << b) - 1)


def is_narrow(bits: int) -> bool:
    """True when the grid does not fill its container (needs a Clip before the Q)."""
    return check_bits(bits) != container_bits(bits)


# ----------------------------------------------------------------------------------------------- weights

def block_axis(ndim: int, axis: int) -> int:
    """The axis blocked quantization runs along: the input-channel axis paired with output axis `axis`.

    MatMul [K, N] (axis 1) -> 0; Gemm transB=1 [N, K] (axis 0) -> 1; Conv [O, I, kh, kw] (axis 0) -> 1;
    ConvTranspose [I, O, kh, kw] (axis 1) -> 0.
    """
    axis = axis % ndim if ndim else axis
    if ndim < 2 or axis not in (0, 1):
        raise InputError(f"blocked quantization needs a weight of rank >= 2 with output axis 0 or 1 "
                         f"(got rank {ndim}, axis {axis})")
    return 1 - axis


def blocked_scale_shape(shape: tuple[int, ...], axis: int, block_size: int) -> tuple[int, ...]:
    """Scale shape for blocked quantization (ONNX opset 21): the weight shape with the block axis divided
    (rounded up) by block_size."""
    b_ax = block_axis(len(shape), axis)
    out = list(shape)
    out[b_ax] = math.ceil(shape[b_ax] / block_size)
    return tuple(out)


def expand_scale(scale: np.ndarray, shape: tuple[int, ...], axis: int, block_size: int | None) -> np.ndarray:
    """Broadcast a per-tensor / per-channel / blocked scale to the full weight shape."""
    scale = np.asarray(scale, dtype=np.float32)
    shape = tuple(int(d) for d in shape)
    if block_size:
        b_ax = block_axis(len(shape), axis)
        expected = blocked_scale_shape(shape, axis, block_size)
        if scale.shape != expected:
            raise InputError(f"blocked scale has shape {scale.shape}, expected {expected} "
                             f"(weight {shape}, axis {axis}, block {block_size})")
        return np.repeat(scale, block_size, axis=b_ax)[tuple(slice(0, d) for d in shape)]
    if scale.size == 1:
        return np.full(shape, scale.reshape(()), dtype=np.float32)
    ax = axis % len(shape)
    if scale.ndim != 1 or scale.shape[0] != shape[ax]:
        raise InputError(f"per-channel scale has shape {scale.shape}, expected ({shape[ax]},) "
                         f"(weight {shape}, axis {ax})")
    bshape = [1] * len(shape)
    bshape[ax] = shape[ax]
    return np.broadcast_to(scale.reshape(bshape), shape)


def quantize_weight(w: np.ndarray, wq: WeightQuant) -> np.ndarray:
    """Integers (int8 array) of `w` on wq's grid: the given values if any, else rint(w / scale) clipped."""
    w = np.asarray(w)
    if wq.values is not None:
        q = np.asarray(wq.values)
        if q.shape != w.shape:
            raise InputError(f"quantized values have shape {q.shape}, weight has {w.shape}")
        if q.size and (q.min() < wq.qmin or q.max() > wq.qmax):
            raise InputError(f"quantized values leave the {wq.bits}-bit grid [{wq.qmin}, {wq.qmax}]")
        return q.astype(np.int8)
    s = expand_scale(wq.scale, w.shape, wq.axis, wq.block_size)
    return np.clip(np.rint(w.astype(np.float32) / s), wq.qmin, wq.qmax).astype(np.int8)


def dequantize_weight(q: np.ndarray, wq: WeightQuant) -> np.ndarray:
    """Float weight the DequantizeLinear computes: q * scale (zero point 0)."""
    q = np.asarray(q)
    return (q.astype(np.float32) * expand_scale(wq.scale, q.shape, wq.axis, wq.block_size)).astype(np.float32)


def weight_quant_from_minmax(w: np.ndarray, axis: int, bits: int, block_size: int | None = None) -> WeightQuant:
    """Symmetric absmax scales: per output channel along `axis`, or per block of `block_size` input channels.

    scale = max|w| / (2^(b-1) - 1), floored at MIN_SCALE (an all-zero channel gets MIN_SCALE: its integers are 0).
    """
    w = np.asarray(w, dtype=np.float32)
    bits = check_bits(bits, "weight bits")
    if not np.all(np.isfinite(w)):
        raise CalibrationError("weight contains NaN or Inf; cannot choose a quantization scale")
    if w.ndim == 0:
        raise InputError("cannot quantize a scalar weight per channel")
    qmax = (1 << (bits - 1)) - 1
    ax = axis % w.ndim
    if block_size:
        if block_size < 1:
            raise InputError(f"block size {block_size} must be positive")
        b_ax = block_axis(w.ndim, ax)
        n_blocks = math.ceil(w.shape[b_ax] / block_size)
        pad = n_blocks * block_size - w.shape[b_ax]
        a = np.abs(w)
        if pad:
            widths = [(0, 0)] * w.ndim
            widths[b_ax] = (0, pad)
            a = np.pad(a, widths)
        new_shape = list(a.shape[:b_ax]) + [n_blocks, block_size] + list(a.shape[b_ax + 1:])
        absmax = a.reshape(new_shape).max(axis=b_ax + 1)
    else:
        absmax = np.abs(w).max(axis=tuple(i for i in range(w.ndim) if i != ax))
    scale = np.maximum(absmax / qmax, MIN_SCALE).astype(np.float32)
    return WeightQuant(scale=scale, axis=ax, bits=bits, block_size=block_size or None)


# ------------------------------------------------------------------------------------------- activations

def activation_quant_from_range(lo: float, hi: float, bits: int, symmetric: bool) -> ActivationQuant:
    """Per-tensor quantization covering [lo, hi].

    asymmetric (target ort): the range is widened to include 0, unsigned grid [0, 2^b-1],
    scale = (hi - lo) / (2^b - 1), zero point = rint(-lo / scale) clipped to the grid.
    symmetric (target trt): signed grid, zero point 0, scale = max(|lo|, |hi|) / (2^(b-1) - 1).
    """
    bits = check_bits(bits, "activation bits")
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise CalibrationError(f"activation range [{lo}, {hi}] is not finite")
    if lo > hi:
        raise CalibrationError(f"activation range [{lo}, {hi}] is empty (min > max)")
    if symmetric:
        qmax = (1 << (bits - 1)) - 1
        scale = max(max(abs(lo), abs(hi)) / qmax, MIN_SCALE)
        return ActivationQuant(scale=float(np.float32(scale)), zero_point=0, bits=bits, signed=True)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    qmax = (1 << bits) - 1
    scale = float(np.float32(max((hi - lo) / qmax, MIN_SCALE)))
    zp = int(np.clip(np.rint(-lo / scale), 0, qmax))
    return ActivationQuant(scale=scale, zero_point=zp, bits=bits, signed=False)


def fake_quant_activation(x: np.ndarray, aq: ActivationQuant) -> np.ndarray:
    """What the emitted (Clip ->) QuantizeLinear -> DequantizeLinear computes, in numpy float32."""
    x = np.asarray(x, dtype=np.float32)
    q = np.clip(np.rint(x / np.float32(aq.scale)) + aq.zero_point, aq.qmin, aq.qmax)
    return ((q - aq.zero_point) * np.float32(aq.scale)).astype(np.float32)


def clip_range(aq: ActivationQuant) -> tuple[float, float]:
    """Real-valued range of aq's grid: [(qmin - zp) * s, (qmax - zp) * s] (the Clip before a narrow-grid Q)."""
    s = np.float32(aq.scale)
    return float((aq.qmin - aq.zero_point) * s), float((aq.qmax - aq.zero_point) * s)


# ------------------------------------------------------------------------------------------ INT4 packing

def pack_int4(values: np.ndarray) -> bytes:
    """Pack 4-bit integers (signed [-8, 7] or unsigned [0, 15]) two to a byte, in row-major order, first
    element in the low nibble (the ONNX INT4/UINT4 and TensorRT layout); an odd count pads the last high
    nibble with 0."""
    v = np.asarray(values).reshape(-1).astype(np.int16)
    if v.size and (v.min() < -8 or v.max() > 15):
        raise InputError("value out of the 4-bit range")
    nib = (v & 0xF).astype(np.uint8)
    if nib.size % 2:
        nib = np.append(nib, np.uint8(0))
    return (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8).tobytes()


def unpack_int4(data: bytes, count: int, signed: bool) -> np.ndarray:
    """Inverse of pack_int4: `count` values as int8 (signed) or uint8."""
    b = np.frombuffer(data, dtype=np.uint8)
    nib = np.empty(b.size * 2, dtype=np.uint8)
    nib[0::2] = b & 0xF
    nib[1::2] = b >> 4
    nib = nib[:count]
    if signed:
        return np.where(nib >= 8, nib.astype(np.int16) - 16, nib).astype(np.int8)
    return nib
