"""Shape, indexing, creation, type and reduction ops."""
from __future__ import annotations

import math

import numpy as np
import torch

from . import NodeCtx, ints, register, tensor_from_proto, torch_dtype


def _axis(a: int, rank: int) -> int:
    return a + rank if a < 0 else a


# ---- shape ----------------------------------------------------------------------------------------------

@register("Reshape", host_inputs=(1,))
def _reshape(node: NodeCtx):
    allowzero = node.attr("allowzero", 0)

    def reshape(x, shape):
        s = ints(shape)
        if not allowzero:
            s = [x.shape[i] if d == 0 else d for i, d in enumerate(s)]
        return x.reshape(s)
    return reshape


@register("Flatten")
def _flatten(node: NodeCtx):
    axis = node.attr("axis", 1)

    def flatten(x):
        a = _axis(axis, x.dim())
        return x.reshape(math.prod(x.shape[:a]), math.prod(x.shape[a:]))
    return flatten


@register("Transpose")
def _transpose(node: NodeCtx):
    perm = node.attr("perm")
    if perm is None:
        return lambda x: x.permute(tuple(reversed(range(x.dim()))))
    perm = tuple(perm)
    return lambda x: x.permute(perm)


@register("Squeeze", host_inputs=(1,))
def _squeeze(node: NodeCtx):
    attr_axes = node.attr("axes")

    def squeeze(x, axes=None):
        ax = ints(axes) if axes is not None else attr_axes
        if ax is None:
            return x.squeeze()
        return x.squeeze(tuple(_axis(a, x.dim()) for a in ax)) if ax else x
    return squeeze


@register("Unsqueeze", host_inputs=(1,))
def _unsqueeze(node: NodeCtx):
    attr_axes = node.attr("axes")

    def unsqueeze(x, axes=None):
        ax = ints(axes) if axes is not None else attr_axes
        r = x.dim() + len(ax)
        for a in sorted(_axis(a, r) for a in ax):
            x = x.unsqueeze(a)
        return x
    return unsqueeze


@register("Concat")
def _concat(node: NodeCtx):
    axis = node.attr("axis")
    return lambda *xs: torch.cat(xs, axis)


@register("Split", host_inputs=(1,))
def _split(node: NodeCtx):
    axis = node.attr("axis", 0)
    attr_split = node.attr("split")
    n_out = node.attr("num_outputs", node.num_outputs)

    def split(x, sizes=None):
        a = _axis(axis, x.dim())
        s = ints(sizes) if sizes is not None else attr_split
        if not s:
            n = x.shape[a]
            chunk = -(-n // n_out)
            s = [chunk] * (n // chunk) + ([n % chunk] if n % chunk else [])
        return tuple(torch.split(x, list(s), a))
    return split


@register("Slice", host_inputs=(1, 2, 3, 4))
def _slice(node: NodeCtx):
    if node.opset < 10:
        st, en, ax = node.attr("starts"), node.attr("ends"), node.attr("axes")
        return lambda x: _do_slice(x, st, en, ax, None)
    return lambda x, starts, ends, axes=None, steps=None: _do_slice(
        x, ints(starts), ints(ends), ints(axes) if axes is not None else None,
        ints(steps) if steps is not None else None)


def _do_slice(x, starts, ends, axes, steps):
    r = x.dim()
    axes = range(len(starts)) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    idx = [slice(None)] * r
    for s, e, a, k in zip(starts, ends, axes, steps):
        a = _axis(a, r)
        n = x.shape[a]
        s = s + n if s < 0 else s
        e = e + n if e < 0 else e
        if k > 0:
            idx[a] = slice(min(max(s, 0), n), min(max(e, 0), n), k)
        else:  # negative step: flip the axis and slice forward
            s, e = min(max(s, 0), n - 1), min(max(e, -1), n - 1)
            x = torch.flip(x, (a,))
            idx[a] = slice(n - 1 - s, n - 1 - e, -k) if n else slice(0, 0)
    return x[tuple(idx)]


@register("Gather")
def _gather(node: NodeCtx):
    axis = node.attr("axis", 0)

    def gather(x, idx):
        a = _axis(axis, x.dim())
        i = idx.reshape(-1).long()
        i = torch.where(i < 0, i + x.shape[a], i)
        return x.index_select(a, i).reshape(x.shape[:a] + idx.shape + x.shape[a + 1:])
    return gather


@register("GatherND")
def _gather_nd(node: NodeCtx):
    """data[i_0, ..., i_{k-1}] for each k-vector of indices; batch_dims leading dims index together. (vit_h's
    relative-position lookup: its table is too large for the exporter's constant folding, so it stays a node.)"""
    b = node.attr("batch_dims", 0)

    def gather_nd(x, idx):
        k = idx.shape[-1]
        i = idx.long()
        lead = x.shape[:b]
        nb = int(np.prod(lead)) if b else 1
        xb = x.reshape((nb,) + tuple(x.shape[b:]))
        ib = i.reshape((nb, -1, k))
        dims = torch.tensor(xb.shape[1:1 + k], device=i.device)
        ib = torch.where(ib < 0, ib + dims, ib)
        rows = torch.arange(nb, device=x.device).reshape(nb, 1).expand(nb, ib.shape[1])
        out = xb[(rows,) + tuple(ib[..., j] for j in range(k))]        # [nb, m, *x.shape[b + k:]]
        return out.reshape(tuple(idx.shape[:-1]) + tuple(x.shape[b + k:]))
    return gather_nd


@register("GatherElements")
def _gather_elements(node: NodeCtx):
    axis = node.attr("axis", 0)

    def gather_elements(x, idx):
        a = _axis(axis, x.dim())
        i = idx.long()
        return torch.gather(x, a, torch.where(i < 0, i + x.shape[a], i))
    return gather_elements


@register("Expand", host_inputs=(1,))
def _expand(node: NodeCtx):
    def expand(x, shape):
        return x.expand(torch.broadcast_shapes(x.shape, tuple(ints(shape))))
    return expand


@register("Tile", host_inputs=(1,))
def _tile(node: NodeCtx):
    return lambda x, repeats: x.repeat(ints(repeats))


@register("Pad", host_inputs=(1, 2, 3))
def _pad(node: NodeCtx):
    mode = node.attr("mode", "constant")
    if mode not in ("constant", "reflect", "edge", "wrap"):
        raise node.unsupported(f"mode {mode!r}")
    if node.opset < 11:
        pads_attr, value_attr = node.attr("pads"), node.attr("value", 0.0)
        return lambda x: _do_pad(x, mode, pads_attr, value_attr, None)
    return lambda x, pads, value=None, axes=None: _do_pad(
        x, mode, ints(pads), value.item() if value is not None and value.numel() else 0,
        ints(axes) if axes is not None else None)


def _do_pad(x, mode, pads, value, axes):
    r = x.dim()
    axes = list(range(r)) if axes is None else [_axis(a, r) for a in axes]
    n = len(axes)
    begin, end = [0] * r, [0] * r
    for a, b, e in zip(axes, pads[:n], pads[n:]):
        begin[a], end[a] = b, e
    if mode == "constant":
        flat = []
        for d in reversed(range(r)):
            flat += [begin[d], end[d]]
        return torch.nn.functional.pad(x, flat, value=value)
    for d in range(r):
        if begin[d] == 0 and end[d] == 0:
            continue
        size = x.shape[d]
        i = torch.arange(-begin[d], size + end[d], device=x.device)
        if mode == "edge":
            i = i.clamp(0, size - 1)
        elif mode == "wrap":
            i = i.remainder(size)
        else:  # reflect (without repeating the edge value)
            period = 2 * (size - 1)
            i = i.remainder(period) if period else torch.zeros_like(i)
            i = torch.where(i >= size, period - i, i)
        x = x.index_select(d, i)
    return x


@register("Shape", shape_only=True)
def _shape(node: NodeCtx):
    start, end = node.attr("start", 0), node.attr("end")
    state = node.state
    return lambda x: torch.tensor(list(x.shape)[start:end], dtype=torch.int64, device=state.device)


@register("Size", shape_only=True)
def _size(node: NodeCtx):
    state = node.state
    return lambda x: torch.tensor(x.numel(), dtype=torch.int64, device=state.device)


# ---- creation -------------------------------------------------------------------------------------------

@register("Constant")
def _constant(node: NodeCtx):
    a = node.attrs
    where = f"Constant node '{node.name}': "
    if "value" in a:
        t = tensor_from_proto(a["value"], where)
    elif "value_float" in a:
        t = torch.tensor(a["value_float"], dtype=torch.float32)
    elif "value_floats" in a:
        t = torch.tensor(a["value_floats"], dtype=torch.float32)
    elif "value_int" in a:
        t = torch.tensor(a["value_int"], dtype=torch.int64)
    elif "value_ints" in a:
        t = torch.tensor(a["value_ints"], dtype=torch.int64)
    else:
        raise node.unsupported(f"a constant given as {sorted(a)}")
    state, per_device = node.state, {}

    def constant():
        d = state.device
        if d not in per_device:
            per_device[d] = t.to(d)
        return per_device[d]
    return constant


@register("ConstantOfShape", host_inputs=(0,))
def _constant_of_shape(node: NodeCtx):
    v = node.attr("value")
    val = tensor_from_proto(v, f"ConstantOfShape node '{node.name}': ") if v is not None else torch.zeros(1)
    scalar, dtype, state = val.reshape(-1)[0].item(), val.dtype, node.state
    return lambda shape: torch.full(ints(shape), scalar, dtype=dtype, device=state.device)


@register("Range", host_inputs=(0, 1, 2))
def _range(node: NodeCtx):
    state = node.state

    def range_(start, limit, delta):
        s, e, d = start.item(), limit.item(), delta.item()
        if (e - s) * d <= 0:
            return torch.empty(0, dtype=start.dtype, device=state.device)
        n = max(math.ceil((e - s) / d), 0)
        return (torch.arange(n, dtype=torch.float64 if start.dtype.is_floating_point else torch.int64,
                             device=state.device) * d + s).to(start.dtype)
    return range_


@register("OneHot", host_inputs=(1,))
def _one_hot(node: NodeCtx):
    axis = node.attr("axis", -1)

    def one_hot(indices, depth, values):
        d = int(depth.item())
        i = indices.long()
        i = torch.where(i < 0, i + d, i)
        r = indices.dim() + 1
        a = _axis(axis, r)
        shape = [1] * r
        shape[a] = d
        hit = i.unsqueeze(a) == torch.arange(d, device=indices.device).reshape(shape)
        return torch.where(hit, values[1], values[0])
    return one_hot


@register("NonZero", data_dependent_shape=True)
def _nonzero(node: NodeCtx):
    return lambda x: torch.nonzero(x).T.contiguous()


@register("Trilu", host_inputs=(1,))
def _trilu(node: NodeCtx):
    upper = node.attr("upper", 1)

    def trilu(x, k=None):
        kk = int(k.item()) if k is not None else 0
        return torch.triu(x, kk) if upper else torch.tril(x, kk)
    return trilu


# ---- types ----------------------------------------------------------------------------------------------

@register("Cast")
def _cast(node: NodeCtx):
    dt = torch_dtype(node.attr("to"), f"Cast node '{node.name}': ")
    return lambda x: x.to(dt)


@register("CastLike")
def _cast_like(node: NodeCtx):
    return lambda x, like: x.to(like.dtype)


# ---- reductions -----------------------------------------------------------------------------------------

def _reduce(fn, axes_input_since: int):
    def build(node: NodeCtx):
        keep = bool(node.attr("keepdims", 1))
        noop = node.attr("noop_with_empty_axes", 0)
        attr_axes = node.attr("axes") if node.opset < axes_input_since else None

        def reduce(x, axes=None):
            ax = ints(axes) if axes is not None else attr_axes
            if not ax:
                if noop:
                    return x
                ax = range(x.dim())
            return fn(x, tuple(_axis(a, x.dim()) for a in ax), keep)
        return reduce
    return build


def _prod(x, dims, keep):
    for d in sorted(dims, reverse=True):
        x = torch.prod(x, d, keepdim=keep) if keep else torch.prod(x, d)
    return x


_REDUCE = {
    "ReduceMean": lambda x, d, k: torch.mean(x, d, keepdim=k),
    "ReduceMax": lambda x, d, k: torch.amax(x, d, keepdim=k),
    "ReduceMin": lambda x, d, k: torch.amin(x, d, keepdim=k),
    "ReduceSum": lambda x, d, k: torch.sum(x, d, keepdim=k).to(x.dtype),
    "ReduceProd": lambda x, d, k: _prod(x, d, k).to(x.dtype),
    "ReduceL1": lambda x, d, k: torch.sum(x.abs(), d, keepdim=k).to(x.dtype),
    "ReduceL2": lambda x, d, k: torch.sqrt(torch.sum(x * x, d, keepdim=k)).to(x.dtype),
    "ReduceSumSquare": lambda x, d, k: torch.sum(x * x, d, keepdim=k).to(x.dtype),
    "ReduceLogSum": lambda x, d, k: torch.log(torch.sum(x, d, keepdim=k)),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, d, keepdim=k),
}
for _op, _fn in _REDUCE.items():
    register(_op, host_inputs=(1,))(_reduce(_fn, 13 if _op == "ReduceSum" else 18))


def _arg(fn):
    def build(node: NodeCtx):
        axis, keep, last = node.attr("axis", 0), bool(node.attr("keepdims", 1)), node.attr("select_last_index", 0)

        def arg(x):
            a = _axis(axis, x.dim())
            if last:
                return x.shape[a] - 1 - fn(torch.flip(x, (a,)), a, keepdim=keep)
            return fn(x, a, keepdim=keep)
        return arg
    return build


register("ArgMax")(_arg(torch.argmax))
register("ArgMin")(_arg(torch.argmin))


@register("CumSum", host_inputs=(1,))
def _cumsum(node: NodeCtx):
    exclusive, reverse = node.attr("exclusive", 0), node.attr("reverse", 0)

    def cumsum(x, axis):
        a = _axis(int(axis.item()), x.dim())
        y = torch.flip(x, (a,)) if reverse else x
        out = torch.cumsum(y, a).to(x.dtype)
        if exclusive:
            out = out - y
        return torch.flip(out, (a,)) if reverse else out
    return cumsum


@register("TopK", host_inputs=(1,))
def _topk(node: NodeCtx):
    axis, largest = node.attr("axis", -1), bool(node.attr("largest", 1))

    def topk(x, k):
        a, kk = _axis(axis, x.dim()), int(k.reshape(-1)[0].item())
        v, i = torch.sort(x, dim=a, descending=largest, stable=True)  # ties: lower index first, as ONNX
        return v.narrow(a, 0, kk), i.narrow(a, 0, kk)
    return topk
