"""Quantization math, once, in numpy: integer grids and their containers, the scale floor, rounding, scale
shapes (per tensor, per channel, blocked), the quantization records and INT4 packing. No torch here;
torchexec/fakequant.py mirrors the arithmetic in torch (a test checks both give identical codes).

Grids (docs/quantization_format.md):
- weights: symmetric, zero point 0, integers in [-2^(b-1), 2^(b-1)-1], scale per output channel (or per block
  of `block_size` input channels); stored in INT4 for b <= 4, INT8 for 5 <= b <= 8;
- activations: per tensor; unsigned grid [0, 2^b-1] with a zero point (asymmetric, target ort) or signed grid
  [-2^(b-1), 2^(b-1)-1] with zero point 0 (symmetric, target trt); container UINT4/INT4 for b <= 4, else
  UINT8/INT8. A grid narrower than its container (b = 2, 3, 5, 6, 7) is enforced by a Clip before the Q.
Rounding is round-half-to-even everywhere (np.rint, torch.round), as in ONNX QuantizeLinear and TensorRT;
x / scale is a true float32 division, as in ONNX Runtime's CPU kernels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import CalibrationError, InputError

MIN_BITS, MAX_BITS = 2, 8
FLOAT_BITS = 16            # "a16": activations stay float
MIN_SCALE = 1e-12          # floor for scales of all-zero (or denormal) channels / tensors

# (qmin, qmax) of the integer types of ONNX Q/DQ, keyed by onnx.TensorProto data type.
ONNX_QRANGE: dict[int, tuple[int, int]] = {
    2: (0, 255),             # UINT8
    3: (-128, 127),          # INT8
    4: (0, 65535),           # UINT16
    5: (-32768, 32767),      # INT16
    6: (-2**31, 2**31 - 1),  # INT32 (DequantizeLinear only)
    21: (0, 15),             # UINT4
    22: (-8, 7),             # INT4
}


def check_bits(bits: int, what: str = "bit-width") -> int:
    if not isinstance(bits, (int, np.integer)) or not MIN_BITS <= int(bits) <= MAX_BITS:
        raise InputError(f"{what} {bits!r} is not supported: use an integer from {MIN_BITS} to {MAX_BITS}")
    return int(bits)


def container_bits(bits: int) -> int:
    """Storage width for a `bits`-wide grid: 4 (INT4/UINT4) for bits <= 4, else 8 (INT8/UINT8)."""
    return 4 if check_bits(bits) <= 4 else 8


def grid(bits: int, signed: bool) -> tuple[int, int]:
    """(qmin, qmax) of a `bits`-wide integer grid: signed [-2^(b-1), 2^(b-1)-1], unsigned [0, 2^b-1]."""
    b = check_bits(bits)
    return (-(1 << (b - 1)), (1 << (b - 1)) - 1) if signed else (0, (1 << b) - 1)


def floor_scale(scale):
    """Scales never go below MIN_SCALE (an all-zero channel or tensor then quantizes to 0)."""
    return np.maximum(scale, MIN_SCALE)


# ------------------------------------------------------------------------------------------- rounding

def quantize(x: np.ndarray, scale, zero_point, qmin: int, qmax: int) -> np.ndarray:
    """Integer codes (float32 holding integers): clip(rint(x / scale) + zero_point, qmin, qmax).
    `scale` / `zero_point` must broadcast against x (see expand_scale)."""
    x = np.asarray(x, dtype=np.float32)
    return np.clip(np.rint(x / np.asarray(scale, dtype=np.float32)) + zero_point, qmin, qmax).astype(np.float32)


def dequantize(q: np.ndarray, scale, zero_point=0) -> np.ndarray:
    """(q - zero_point) * scale in float32."""
    return ((np.asarray(q, dtype=np.float32) - zero_point) * np.asarray(scale, dtype=np.float32)).astype(np.float32)


def fake_quant(x: np.ndarray, scale, zero_point, qmin: int, qmax: int) -> np.ndarray:
    """What a QuantizeLinear -> DequantizeLinear pair computes."""
    return dequantize(quantize(x, scale, zero_point, qmin, qmax), scale, zero_point)


# -------------------------------------------------------------------------------------------- scale shapes

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
    """Broadcast a per-tensor / per-channel (along output axis `axis`) / blocked scale to the full shape."""
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


def weight_absmax(w: np.ndarray, axis: int, block_size: int | None = None) -> np.ndarray:
    """max |w| per output channel along `axis`, or per block of `block_size` input channels (blocked shape)."""
    ax = axis % w.ndim
    if not block_size:
        return np.abs(w).max(axis=tuple(i for i in range(w.ndim) if i != ax))
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
    return a.reshape(new_shape).max(axis=b_ax + 1)


def symmetric_scale(absmax, bits: int) -> np.ndarray:
    """Scale of a symmetric `bits` grid covering [-absmax, absmax]: absmax / (2^(b-1) - 1), floored."""
    return floor_scale(np.asarray(absmax) / grid(bits, True)[1]).astype(np.float32)


def activation_qparams(lo: float, hi: float, bits: int, symmetric: bool) -> tuple[float, int]:
    """(scale, zero point) of a per-tensor grid covering [lo, hi].

    asymmetric: the range is widened to include 0, unsigned grid [0, 2^b-1], scale = (hi - lo) / (2^b - 1)
    rounded to float32, zero point = rint(-lo / scale) clipped to the grid.
    symmetric: signed grid, zero point 0, scale = max(|lo|, |hi|) / (2^(b-1) - 1) rounded to float32.
    """
    bits = check_bits(bits, "activation bits")
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise CalibrationError(f"activation range [{lo}, {hi}] is not finite")
    if lo > hi:
        raise CalibrationError(f"activation range [{lo}, {hi}] is empty (min > max)")
    if symmetric:
        qmax = grid(bits, True)[1]
        return float(np.float32(max(max(abs(lo), abs(hi)) / qmax, MIN_SCALE))), 0
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    qmax = grid(bits, False)[1]
    scale = float(np.float32(max((hi - lo) / qmax, MIN_SCALE)))
    return scale, int(np.clip(np.rint(-lo / scale), 0, qmax))


# ------------------------------------------------------------------------------------ quantization records

@dataclass(frozen=True)
class ActivationQuant:
    """Per-tensor quantization of one activation value."""

    scale: float
    zero_point: int
    bits: int          # grid bits (2..8); the container is INT4/UINT4 for bits <= 4, else INT8/UINT8
    signed: bool       # True: INT container, symmetric grid [-2^(b-1), 2^(b-1)-1]; False: UINT, [0, 2^b-1]

    @property
    def qmin(self) -> int:
        return grid(self.bits, self.signed)[0]

    @property
    def qmax(self) -> int:
        return grid(self.bits, self.signed)[1]


@dataclass(frozen=True)
class WeightQuant:
    """Symmetric (zero point 0) quantization of one weight initializer."""

    scale: np.ndarray            # float32; shape [C] per channel along `axis`, or blocked shape (see block_size)
    axis: int                    # the output-channel axis of the initializer
    bits: int                    # grid bits; values in [-2^(b-1), 2^(b-1)-1]
    block_size: int | None = None
    values: np.ndarray | None = None  # int8 integers on the grid; None -> rint(w / scale) at emission

    @property
    def qmin(self) -> int:
        return grid(self.bits, True)[0]

    @property
    def qmax(self) -> int:
        return grid(self.bits, True)[1]


def weight_quant_from_minmax(w: np.ndarray, axis: int, bits: int, block_size: int | None = None) -> WeightQuant:
    """Symmetric absmax scales: per output channel along `axis`, or per block of `block_size` input channels."""
    w = np.asarray(w, dtype=np.float32)
    bits = check_bits(bits, "weight bits")
    if not np.all(np.isfinite(w)):
        raise CalibrationError("weight contains NaN or Inf; cannot choose a quantization scale")
    if w.ndim == 0:
        raise InputError("cannot quantize a scalar weight per channel")
    scale = symmetric_scale(weight_absmax(w, axis, block_size), bits)
    return WeightQuant(scale=scale, axis=axis % w.ndim, bits=bits, block_size=block_size or None)


def activation_quant_from_range(lo: float, hi: float, bits: int, symmetric: bool) -> ActivationQuant:
    """Per-tensor quantization covering [lo, hi] (see activation_qparams)."""
    scale, zp = activation_qparams(lo, hi, bits, symmetric)
    return ActivationQuant(scale=scale, zero_point=zp, bits=check_bits(bits), signed=symmetric)


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
    return quantize(w, s, 0, wq.qmin, wq.qmax).astype(np.int8)


def dequantize_weight(q: np.ndarray, wq: WeightQuant) -> np.ndarray:
    """Float weight the DequantizeLinear computes: q * scale (zero point 0)."""
    q = np.asarray(q)
    return dequantize(q, expand_scale(wq.scale, q.shape, wq.axis, wq.block_size))


def fake_quant_activation(x: np.ndarray, aq: ActivationQuant) -> np.ndarray:
    """What the emitted (Clip ->) QuantizeLinear -> DequantizeLinear computes, in numpy float32."""
    return fake_quant(x, np.float32(aq.scale), aq.zero_point, aq.qmin, aq.qmax)


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


# ------------------------------------------------------------------------------------------------ quality

def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of `test` against `ref` in dB (inf when they are equal)."""
    ref = np.asarray(ref, dtype=np.float64)
    return sqnr_from_sums(float(np.sum(ref ** 2)), float(np.sum((ref - test) ** 2)))


def sqnr_from_sums(signal: float, noise: float) -> float:
    """SQNR in dB from summed squared signal and summed squared error (accumulated over several tensors)."""
    return float("inf") if noise == 0 else 10 * np.log10(max(signal, 1e-30) / noise)


# ---------------------------------------------------------------------------------- x86 int16 pair sums

INT16_MIN, INT16_MAX = -(1 << 15), (1 << 15) - 1


def vpmaddubsw(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """What x86 VPMADDUBSW computes (ONNX Runtime's U8S8 kernels on CPUs without VNNI): unsigned bytes `a` times
    signed bytes `b`, adjacent pairs summed and saturated to int16. a, b: [..., 2n] -> [..., n] int16."""
    a = np.asarray(a).astype(np.int32)
    b = np.asarray(b).astype(np.int32)
    if a.shape[-1] % 2 or np.any((a < 0) | (a > 255)) or np.any((b < -128) | (b > 127)):
        raise InputError("vpmaddubsw takes an even number of uint8 x int8 values")
    p = a * b
    return np.clip(p[..., 0::2] + p[..., 1::2], INT16_MIN, INT16_MAX).astype(np.int16)


def u8s8_pair_sum_range(q: np.ndarray, axis: int, act_max: int = 255) -> tuple[int, int]:
    """Extreme pair sums a0*w0 + a1*w1 over uint8 activations in [0, act_max] and ANY two weights of one output
    channel (whatever order a kernel packs them in): per channel the two largest positive weights times act_max,
    and the two most negative. Both within [-32768, 32767] means VPMADDUBSW cannot saturate on this layer."""
    w = np.moveaxis(np.asarray(q).astype(np.int64), axis % np.ndim(q), 0).reshape(np.shape(q)[axis], -1)
    if w.shape[1] < 2:
        w = np.concatenate([w, np.zeros_like(w)], axis=1)
    s = np.sort(w, axis=1)
    hi = act_max * np.maximum(s[:, -2:], 0).sum(axis=1)
    lo = act_max * np.minimum(s[:, :2], 0).sum(axis=1)
    return int(lo.min()), int(hi.max())
