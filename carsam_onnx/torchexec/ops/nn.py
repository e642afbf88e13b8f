"""Neural-network ops: matrix products, convolutions, normalisation, softmax, pooling, resize."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import NodeCtx, ints, register


@register("MatMul")
def _matmul(node: NodeCtx):
    return torch.matmul


@register("Gemm")
def _gemm(node: NodeCtx):
    alpha, beta = node.attr("alpha", 1.0), node.attr("beta", 1.0)
    ta, tb = node.attr("transA", 0), node.attr("transB", 0)

    def gemm(a, b, c=None):
        a = a.T if ta else a
        b = b.T if tb else b
        if c is not None and alpha == 1.0 and beta == 1.0 and a.dtype.is_floating_point:
            return torch.addmm(c, a, b) if c.dim() <= 2 else a @ b + c
        y = a @ b
        if alpha != 1.0:
            y = y * alpha
        if c is not None:
            y = y + (c * beta if beta != 1.0 else c)
        return y
    return gemm


@register("Einsum")
def _einsum(node: NodeCtx):
    eq = node.attr("equation").replace(" ", "")
    return lambda *xs: torch.einsum(eq, *xs)


def _conv_padding(node: NodeCtx, x_spatial, kernel, strides, dilations):
    """Explicit (begin..., end...) pads for a Conv node, resolving auto_pad."""
    auto = node.attr("auto_pad", "NOTSET")
    nd = len(kernel)
    if auto in ("NOTSET", ""):
        return list(node.attr("pads", [0] * (2 * nd)))
    if auto == "VALID":
        return [0] * (2 * nd)
    begin, end = [], []
    for i in range(nd):
        out = -(-x_spatial[i] // strides[i])
        total = max((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - x_spatial[i], 0)
        small, big = total // 2, total - total // 2
        begin.append(big if auto == "SAME_LOWER" else small)
        end.append(small if auto == "SAME_LOWER" else big)
    return begin + end


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONVT = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@register("Conv")
def _conv(node: NodeCtx):
    group = node.attr("group", 1)

    def conv(x, w, b=None):
        nd = w.dim() - 2
        kernel = list(w.shape[2:])
        strides = list(node.attr("strides", [1] * nd))
        dil = list(node.attr("dilations", [1] * nd))
        pads = _conv_padding(node, list(x.shape[2:]), kernel, strides, dil)
        if pads[:nd] == pads[nd:]:
            return _CONV[nd](x, w, b, strides, pads[:nd], dil, group)
        flat = []
        for i in reversed(range(nd)):
            flat += [pads[i], pads[nd + i]]
        return _CONV[nd](F.pad(x, flat), w, b, strides, 0, dil, group)
    return conv


@register("ConvTranspose")
def _conv_transpose(node: NodeCtx):
    group = node.attr("group", 1)

    def conv_t(x, w, b=None):
        nd = w.dim() - 2
        kernel = list(w.shape[2:])
        strides = list(node.attr("strides", [1] * nd))
        dil = list(node.attr("dilations", [1] * nd))
        out_pad = list(node.attr("output_padding", [0] * nd))
        in_sp = list(x.shape[2:])
        full = [(in_sp[i] - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1 + out_pad[i] for i in range(nd)]
        out_shape = node.attr("output_shape")
        auto = node.attr("auto_pad", "NOTSET")
        if out_shape is not None or auto in ("SAME_UPPER", "SAME_LOWER"):
            target = list(out_shape)[-nd:] if out_shape is not None else [in_sp[i] * strides[i] for i in range(nd)]
            total = [full[i] - target[i] for i in range(nd)]
            upper = auto == "SAME_UPPER"
            begin = [t // 2 if upper else t - t // 2 for t in total]
            end = [total[i] - begin[i] for i in range(nd)]
        elif auto == "VALID":
            begin, end = [0] * nd, [0] * nd
        else:
            pads = list(node.attr("pads", [0] * (2 * nd)))
            begin, end = pads[:nd], pads[nd:]
        if any(p < 0 for p in begin):
            raise node.unsupported("an output_shape that needs padding before the first element")
        extra = [max(-e, 0) for e in end]  # a negative end pad is extra output padding
        end = [max(e, 0) for e in end]
        out_pad = [out_pad[i] + extra[i] for i in range(nd)]
        if begin == end:
            return _CONVT[nd](x, w, b, strides, begin, out_pad, group, dil)
        y = _CONVT[nd](x, w, b, strides, 0, out_pad, group, dil)
        idx = [slice(None), slice(None)] + [slice(begin[i], y.shape[2 + i] - end[i]) for i in range(nd)]
        return y[tuple(idx)]
    return conv_t


@register("LayerNormalization")
def _layer_norm(node: NodeCtx):
    axis, eps = node.attr("axis", -1), node.attr("epsilon", 1e-5)
    n_out = node.num_outputs

    def layer_norm(x, scale, bias=None):
        a = axis + x.dim() if axis < 0 else axis
        shape = x.shape[a:]
        if n_out == 1 and scale.shape == shape and (bias is None or bias.shape == shape):
            return F.layer_norm(x, shape, scale, bias, eps)
        dims = tuple(range(a, x.dim()))
        mean = x.mean(dims, keepdim=True)
        d = x - mean
        inv = torch.rsqrt((d * d).mean(dims, keepdim=True) + eps)
        y = d * inv * scale
        if bias is not None:
            y = y + bias
        return (y, mean, inv)[:n_out] if n_out > 1 else y
    return layer_norm


@register("BatchNormalization")
def _batch_norm(node: NodeCtx):
    eps = node.attr("epsilon", 1e-5)
    if node.attr("training_mode", 0) or node.num_outputs > 1:
        raise node.unsupported("training mode")
    return lambda x, s, b, mean, var: F.batch_norm(x, mean, var, s, b, False, 0.0, eps)


@register("InstanceNormalization")
def _instance_norm(node: NodeCtx):
    eps = node.attr("epsilon", 1e-5)
    return lambda x, s, b: F.instance_norm(x, weight=s, bias=b, eps=eps)


def _softmax(fn):
    def build(node: NodeCtx):
        default = -1 if node.opset >= 13 else 1
        axis = node.attr("axis", default)
        if node.opset >= 13:
            return lambda x: fn(x, axis)

        def coerced(x):  # before opset 13: softmax over the flattened dims from `axis` on
            a = axis + x.dim() if axis < 0 else axis
            return fn(x.reshape(math.prod(x.shape[:a]), -1), 1).reshape(x.shape)
        return coerced
    return build


def _hardmax(x, a):
    return F.one_hot(torch.argmax(x, a), x.shape[a]).movedim(-1, a).to(x.dtype)


register("Softmax")(_softmax(lambda x, a: torch.softmax(x, a)))
register("LogSoftmax")(_softmax(lambda x, a: torch.log_softmax(x, a)))
register("Hardmax")(_softmax(_hardmax))


@register("Dropout", host_inputs=(1, 2))
def _dropout(node: NodeCtx):
    n_out = node.num_outputs

    def dropout(x, ratio=None, training=None):
        if training is not None and bool(training.item()):
            raise node.unsupported("training mode")
        return (x, torch.ones_like(x, dtype=torch.bool)) if n_out > 1 else x
    return dropout


def _pool_args(node: NodeCtx, x, kernel):
    nd = len(kernel)
    strides = list(node.attr("strides", [1] * nd))
    dil = list(node.attr("dilations", [1] * nd))
    pads = _conv_padding(node, list(x.shape[2:]), kernel, strides, dil)
    return strides, dil, pads


@register("MaxPool")
def _max_pool(node: NodeCtx):
    kernel = list(node.attr("kernel_shape"))
    ceil = bool(node.attr("ceil_mode", 0))
    if node.num_outputs > 1 or node.attr("storage_order", 0):
        raise node.unsupported("the Indices output")
    fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[len(kernel)]

    def max_pool(x):
        strides, dil, pads = _pool_args(node, x, kernel)
        nd = len(kernel)
        if pads[:nd] != pads[nd:] or any(2 * p > k for p, k in zip(pads[:nd], kernel)):
            flat = []
            for i in reversed(range(nd)):
                flat += [pads[i], pads[nd + i]]
            x = F.pad(x, flat, value=-math.inf)
            pads = [0] * (2 * nd)
        return fn(x, kernel, strides, pads[:nd], dil, ceil)
    return max_pool


@register("AveragePool")
def _avg_pool(node: NodeCtx):
    kernel = list(node.attr("kernel_shape"))
    ceil = bool(node.attr("ceil_mode", 0))
    count_pad = bool(node.attr("count_include_pad", 0))
    if any(d != 1 for d in node.attr("dilations", [1] * len(kernel))):
        raise node.unsupported("dilations")
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[len(kernel)]

    def avg_pool(x):
        strides, _, pads = _pool_args(node, x, kernel)
        nd = len(kernel)
        if pads[:nd] != pads[nd:] or any(2 * p > k for p, k in zip(pads[:nd], kernel)):
            raise node.unsupported("asymmetric or oversized pads")
        return fn(x, kernel, strides, pads[:nd], ceil, count_pad)
    return avg_pool


@register("GlobalAveragePool")
def _gap(node: NodeCtx):
    return lambda x: x.mean(tuple(range(2, x.dim())), keepdim=True)


@register("GlobalMaxPool")
def _gmp(node: NodeCtx):
    return lambda x: x.amax(tuple(range(2, x.dim())), keepdim=True)


# ---- Resize -----------------------------------------------------------------------------------------------

def _source_coords(coord: str, out_len: int, in_len: int, scale: float, device) -> torch.Tensor:
    """ONNX's coordinate_transformation_mode: output index -> (fractional) input coordinate. As in ONNX's
    reference, align_corners divides by the unrounded output length in_len * scale."""
    x = torch.arange(out_len, dtype=torch.float64, device=device)
    if coord == "align_corners":
        len_f = in_len * scale
        return x * ((in_len - 1) / (len_f - 1)) if len_f > 1 else torch.zeros_like(x)
    if coord == "asymmetric":
        return x / scale
    if coord == "pytorch_half_pixel":
        return (x + 0.5) / scale - 0.5 if out_len > 1 else torch.zeros_like(x)
    if coord == "half_pixel_symmetric":
        adjust = out_len / (scale * in_len)
        return in_len / 2 * (1 - adjust) + (x + 0.5) / scale - 0.5
    return (x + 0.5) / scale - 0.5  # half_pixel


_NEAREST = {"round_prefer_floor": lambda c: torch.ceil(c - 0.5), "round_prefer_ceil": lambda c: torch.floor(c + 0.5),
            "floor": torch.floor, "ceil": torch.ceil}


def _resize_axis(x: torch.Tensor, axis: int, out_len: int, scale: float, mode: str, coord: str, nearest: str):
    """Separable resize of one axis by gathering (exact ONNX semantics for nearest and linear)."""
    n = x.shape[axis]
    c = _source_coords(coord, out_len, n, scale, x.device)
    if mode == "nearest":
        idx = _NEAREST[nearest](c).clamp(0, n - 1).long()
        return x.index_select(axis, idx)
    c = c.clamp(0, n - 1)
    lo = torch.floor(c).long()
    hi = (lo + 1).clamp(max=n - 1)
    shape = [1] * x.dim()
    shape[axis] = out_len
    w = (c - lo).to(x.dtype).reshape(shape)
    return x.index_select(axis, lo) * (1 - w) + x.index_select(axis, hi) * w


@register("Resize", host_inputs=(1, 2, 3))
def _resize(node: NodeCtx):
    mode = node.attr("mode", "nearest")
    coord = node.attr("coordinate_transformation_mode", "half_pixel")
    nearest = node.attr("nearest_mode", "round_prefer_floor")
    cubic_a = node.attr("cubic_coeff_a", -0.75)
    axes_attr = node.attr("axes")
    policy = node.attr("keep_aspect_ratio_policy", "stretch")
    if policy not in ("stretch", "not_larger", "not_smaller"):
        raise node.unsupported(f"keep_aspect_ratio_policy {policy!r}")
    for attr, default in (("antialias", 0), ("exclude_outside", 0)):
        if node.attr(attr, default) != default:
            raise node.unsupported(f"Resize attribute {attr}={node.attr(attr)!r}")
    if coord == "tf_crop_and_resize":
        raise node.unsupported("coordinate_transformation_mode tf_crop_and_resize")
    if mode not in ("nearest", "linear", "cubic") or nearest not in _NEAREST:
        raise node.unsupported(f"mode {mode!r} / nearest_mode {nearest!r}")
    # torch's interpolate computes these (mode, coordinate transform) pairs exactly and fast.
    fast = None
    if mode == "nearest" and (coord, nearest) == ("asymmetric", "floor"):
        fast = ("nearest", None)
    elif mode == "nearest" and coord in ("half_pixel", "pytorch_half_pixel") and nearest == "round_prefer_ceil":
        fast = ("nearest-exact", None)
    elif mode in ("linear", "cubic") and coord in ("align_corners", "half_pixel", "pytorch_half_pixel"):
        fast = (mode, coord == "align_corners")
    if mode == "cubic" and (fast is None or cubic_a != -0.75):
        raise node.unsupported(f"cubic with {coord} / cubic_coeff_a {cubic_a}")

    def resize(x, roi=None, scales=None, sizes=None):
        nd, r = x.dim() - 2, x.dim()
        axes = [a + r if a < 0 else a for a in axes_attr] if axes_attr is not None else list(range(r))
        out, sc = list(x.shape), [1.0] * r
        if sizes is not None and sizes.numel():
            for a, v in zip(axes, ints(sizes)):
                out[a], sc[a] = v, v / x.shape[a]
            if policy != "stretch":
                pick = min if policy == "not_larger" else max
                s_ = pick(sc[a] for a in axes)
                for a in axes:
                    sc[a], out[a] = s_, math.floor(s_ * x.shape[a] + 0.5)
        else:
            for a, v in zip(axes, scales.tolist()):
                sc[a], out[a] = float(v), math.floor(x.shape[a] * float(v))
        generic = fast is None or out[0] != x.shape[0] or out[1] != x.shape[1] or nd not in (1, 2, 3) or \
            (coord == "pytorch_half_pixel" and any(o == 1 for o in out[2:])) or policy != "stretch" or \
            (fast[1] and sizes is None)  # torch's align_corners with scales rederives them from sizes
        if generic:
            if mode == "cubic":
                raise node.unsupported("cubic resize outside torch's interpolate modes")
            for a in range(x.dim()):
                if out[a] != x.shape[a] or sc[a] != 1:
                    x = _resize_axis(x, a, out[a], sc[a], mode, coord, nearest)
            return x
        kw = {"size": out[2:]} if sizes is not None and sizes.numel() else \
            {"scale_factor": sc[2:], "recompute_scale_factor": False}
        tmode, align = fast
        if tmode in ("nearest", "nearest-exact"):
            return F.interpolate(x, mode=tmode, **kw)
        m = "bicubic" if mode == "cubic" else {1: "linear", 2: "bilinear", 3: "trilinear"}[nd]
        if mode == "cubic" and nd != 2:
            raise node.unsupported("cubic resize of other than 2 spatial axes")
        return F.interpolate(x, mode=m, align_corners=align, **kw)
    return resize
