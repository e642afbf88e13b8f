"""Elementwise ops: arithmetic, math functions, activations, comparisons and logic."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import NodeCtx, register


def _fixed(fn):
    """A builder for an op without attributes: the torch function itself."""
    def build(node: NodeCtx):
        return fn
    return build


_UNARY = {
    "Abs": torch.abs, "Neg": torch.neg, "Exp": torch.exp, "Log": torch.log, "Sqrt": torch.sqrt,
    "Erf": torch.erf, "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Sin": torch.sin,
    "Cos": torch.cos, "Tan": torch.tan, "Asin": torch.asin, "Acos": torch.acos, "Atan": torch.atan,
    "Sinh": torch.sinh, "Cosh": torch.cosh, "Asinh": torch.asinh, "Acosh": torch.acosh, "Atanh": torch.atanh,
    "Floor": torch.floor, "Ceil": torch.ceil, "Round": torch.round, "Reciprocal": torch.reciprocal,
    "Sign": torch.sign, "Not": torch.logical_not, "Softsign": F.softsign, "IsNaN": torch.isnan,
    "BitwiseNot": torch.bitwise_not, "Mish": F.mish,
}
for _op, _fn in _UNARY.items():
    register(_op)(_fixed(_fn))


@register("Identity")
def _identity(node):
    return lambda x: x


@register("Add")
def _add(node):
    return torch.add


@register("Sub")
def _sub(node):
    return torch.sub


@register("Mul")
def _mul(node):
    return torch.mul


@register("Div")
def _div(node):
    def div(a, b):
        if a.dtype.is_floating_point:
            return torch.div(a, b)
        return torch.div(a, b, rounding_mode="trunc")  # ONNX integer Div truncates toward zero
    return div


@register("Pow")
def _pow(node):
    def pow_(a, b):
        if not a.dtype.is_floating_point:
            return torch.pow(a.to(torch.float64), b.to(torch.float64)).to(a.dtype)
        if b.dtype != a.dtype:
            b = b.to(a.dtype)
        return torch.pow(a, b)
    return pow_


@register("Mod")
def _mod(node):
    return torch.fmod if node.attr("fmod", 0) else torch.remainder


def _variadic(fn):
    def build(node):
        def f(*xs):
            out = xs[0]
            for x in xs[1:]:
                out = fn(out, x)
            return out
        return f
    return build


register("Sum")(_variadic(torch.add))
register("Max")(_variadic(torch.maximum))
register("Min")(_variadic(torch.minimum))


@register("Mean")
def _mean(node):
    def f(*xs):
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out / len(xs)
    return f


_COMPARE = {"Equal": torch.eq, "Less": torch.lt, "LessOrEqual": torch.le, "Greater": torch.gt,
            "GreaterOrEqual": torch.ge, "And": torch.logical_and, "Or": torch.logical_or,
            "Xor": torch.logical_xor, "BitwiseAnd": torch.bitwise_and, "BitwiseOr": torch.bitwise_or,
            "BitwiseXor": torch.bitwise_xor}
for _op, _fn in _COMPARE.items():
    register(_op)(_fixed(_fn))


@register("Where")
def _where(node):
    return torch.where


@register("IsInf")
def _isinf(node):
    pos, neg = node.attr("detect_positive", 1), node.attr("detect_negative", 1)

    def f(x):
        if pos and neg:
            return torch.isinf(x)
        if pos:
            return torch.isposinf(x)
        if neg:
            return torch.isneginf(x)
        return torch.zeros_like(x, dtype=torch.bool)
    return f


@register("Clip")
def _clip(node):
    if node.opset < 11:
        lo, hi = node.attr("min", -math.inf), node.attr("max", math.inf)
        return lambda x: torch.clamp(x, lo, hi)

    def clip(x, lo=None, hi=None):
        if lo is not None:
            x = torch.maximum(x, lo.to(x.dtype))
        if hi is not None:
            x = torch.minimum(x, hi.to(x.dtype))
        return x
    return clip


@register("Gelu")
def _gelu(node):
    approximate = node.attr("approximate", "none")
    return lambda x: F.gelu(x, approximate=approximate)


@register("LeakyRelu")
def _leaky(node):
    alpha = node.attr("alpha", 0.01)
    return lambda x: F.leaky_relu(x, alpha)


@register("Elu")
def _elu(node):
    alpha = node.attr("alpha", 1.0)
    return lambda x: F.elu(x, alpha)


@register("Celu")
def _celu(node):
    alpha = node.attr("alpha", 1.0)
    return lambda x: F.celu(x, alpha)


@register("Selu")
def _selu(node):
    alpha = node.attr("alpha", 1.67326319217681884765625)
    gamma = node.attr("gamma", 1.05070102214813232421875)
    return lambda x: gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))


@register("HardSigmoid")
def _hsig(node):
    alpha, beta = node.attr("alpha", 0.2), node.attr("beta", 0.5)
    return lambda x: torch.clamp(alpha * x + beta, 0, 1)


@register("HardSwish")
def _hswish(node):
    return lambda x: x * torch.clamp(x / 6 + 0.5, 0, 1)


@register("Softplus")
def _softplus(node):
    return F.softplus


@register("ThresholdedRelu")
def _trelu(node):
    alpha = node.attr("alpha", 1.0)
    return lambda x: torch.where(x > alpha, x, torch.zeros_like(x))


@register("PRelu")
def _prelu(node):
    return lambda x, slope: torch.where(x < 0, x * slope, x)


@register("Shrink")
def _shrink(node):
    bias, lambd = node.attr("bias", 0.0), node.attr("lambd", 0.5)
    return lambda x: torch.where(x < -lambd, x + bias, torch.where(x > lambd, x - bias, torch.zeros_like(x)))
