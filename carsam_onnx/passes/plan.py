"""Decide what to quantize: the weight layers, their inputs, and both inputs of both attention MatMuls.

- Weight sites: MatMul / Gemm with a constant float weight initializer and an activation input, Conv and
  ConvTranspose. The output-channel axis of the initializer: MatMul [K, N] -> 1 (the last axis), Gemm
  transB=1 -> 0, transB=0 -> 1, Conv -> 0, ConvTranspose -> 1.
- Keep-float: a weight layer stays float when a `config.keep_float` pattern (a regular expression, searched)
  matches its node name, its module path in node metadata (`pkg.torch.onnx.name_scopes`, dynamo exporter), or
  the name of one of its initializers (the official SAM decoder export names its prompt-encoder nodes
  "/mask_downscaling/..." and "/MatMul", but their weights "model.prompt_encoder...."). The same patterns
  matched against an attention's Q.K^T or attn.V MatMul keep that whole attention site in float.
- Constant sites: a float initializer of >= CONSTANT_MIN_SIZE elements and rank >= 2 read by exactly one node
  that is no weight layer (the encoder's pos_embed Add, the relative-position tables the dynamo exporter folds)
  is stored quantized too, weight-only, per channel along its last axis, at CONSTANT_BITS (8) whatever the weight
  bits: such tensors are added to activations, and 8 bits keep them exact to ~0.4% of their range while the
  file still shrinks (at W4 they would otherwise be about a quarter of the vit_b file). Keep-float patterns
  apply to the reading node.
- Activation sites (none when `config.bits.quantize_activations` is false, i.e. wXa16): one per value, listing
  every quantized consumer. The input of a quantized weight layer is a LAYER_INPUT; Q, K^T, the softmax output
  and V as they enter the two attention MatMuls are ATTN_Q / ATTN_K / ATTN_PROBS / ATTN_V. A value that is both
  a layer input and an attention input gets the attention kind (calibration looks attention inputs up by kind)
  and all consumers. Values feeding only float nodes (the prompt path, the heads) are never sites.
"""
from __future__ import annotations

import re

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..config import QuantConfig
from ..errors import InputError, ModelError
from .attention import match_attention
from .patterns import GraphIndex
from .sites import (ActivationKind, ActivationSite, AttentionSite, QuantPlan, WeightKind, WeightSite)

_FLOAT_TYPES = (np.float32, np.float16, np.float64)
CONSTANT_MIN_SIZE = 4096
CONSTANT_BITS = 8
_KIND = {"MatMul": WeightKind.LINEAR, "Gemm": WeightKind.LINEAR, "Conv": WeightKind.CONV,
         "ConvTranspose": WeightKind.CONV_TRANSPOSE}


def compile_patterns(patterns: tuple[str, ...]) -> list[re.Pattern]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise InputError(f"--keep-float {p!r} is not a valid regular expression ({e})") from None
    return out


def keep_float_reason(g: GraphIndex, node: gs.Node, patterns: list[re.Pattern]) -> str | None:
    """Why `node` stays float (the first pattern that matches and where), or None."""
    inits = [t.name for t in node.inputs if isinstance(t, gs.Constant)]
    places = [("node name", node.name), ("module path", g.scopes(node))] + [(f"initializer '{n}'", n) for n in inits]
    for p in patterns:
        for where, text in places:
            if text and p.search(text):
                return f"keep-float pattern {p.pattern!r} matches its {where}"
    return None


def unmatched_patterns(model: onnx.ModelProto, patterns: tuple[str, ...]) -> list[str]:
    """The keep-float patterns that match no node of `model` (its name, module path or an initializer's name, as
    keep_float_reason looks): such a pattern keeps nothing float, most often a typo."""
    if not patterns:
        return []
    g = GraphIndex(model)
    nodes = list(g.graph.nodes)
    return [p.pattern for p in compile_patterns(patterns) if not any(keep_float_reason(g, n, [p]) for n in nodes)]


def _output_axis(node: gs.Node, weight: gs.Constant) -> int | None:
    rank = len(weight.shape)
    if node.op == "MatMul":
        return rank - 1 if rank >= 2 else None
    if node.op == "Gemm":
        return (0 if node.attrs.get("transB", 0) else 1) if rank == 2 else None
    if node.op == "Conv":
        return 0
    return 1  # ConvTranspose: [C_in, C_out / group, k...]


def _weight_site(g: GraphIndex, node: gs.Node) -> tuple[WeightSite | None, str | None]:
    """(site, None) for a quantizable weight layer, (None, reason) for one left float, (None, None) otherwise."""
    if node.op not in _KIND or len(node.inputs) < 2:
        return None, None
    x, w = node.inputs[0], node.inputs[1]
    if not g.is_data(x):
        if g.is_data(w):
            return None, ("its constant operand is on the left (W @ x); only x @ W is quantized"
                          if node.op == "MatMul" else None)
        return None, "all its inputs are constants (it folds to a constant)"
    if g.is_data(w):
        return None, None  # activation x activation (attention, mask head): not a weight layer
    init = g.initializer(w)
    if init is None:
        return None, "its weight is computed or a Constant node, not an initializer"
    if init.dtype not in _FLOAT_TYPES:
        return None, f"its weight is {np.dtype(init.dtype).name}, not float"
    axis = _output_axis(node, init)
    if axis is None:
        return None, f"unsupported weight rank {len(init.shape)} for {node.op}"
    return WeightSite(node=g.name(node), initializer=init.name, axis=axis, kind=_KIND[node.op]), None


def plan_quantization(model: onnx.ModelProto, config: QuantConfig) -> QuantPlan:
    """The quantization plan of `model` under `config` (see the module docstring for the rules)."""
    g = GraphIndex(model)
    patterns = compile_patterns(config.keep_float)
    matches, _ = match_attention(model, g)
    if config.require_attention and not matches:
        raise ModelError("no attention block found in the model (see `carsam-onnx inspect` for why each "
                         "Softmax was rejected); is this a SAM export?")

    weights: list[WeightSite] = []
    kept: list[tuple[str, str]] = []
    quantized_layers: set[str] = set()
    for node in g.graph.nodes:
        site, why = _weight_site(g, node)
        if site is None:
            if why is not None:
                kept.append((g.name(node), why))
            continue
        reason = keep_float_reason(g, node, patterns)
        if reason is not None:
            kept.append((site.node, reason))
            continue
        weights.append(site)
        quantized_layers.add(site.node)

    weights.extend(_constant_sites(g, {w.initializer for w in weights}, patterns, kept))

    nodes = {n.name: n for n in g.graph.nodes if n.name}
    attention: list[AttentionSite] = []
    for m in matches:
        s = m.site
        reason = (keep_float_reason(g, nodes[s.qk_matmul], patterns)
                  or keep_float_reason(g, nodes[s.av_matmul], patterns))
        if reason is not None:
            kept.extend([(s.qk_matmul, f"attention kept float: {reason}"),
                         (s.av_matmul, f"attention kept float: {reason}")])
        else:
            attention.append(s)

    activations = _activation_sites(g, quantized_layers, attention) if config.bits.quantize_activations else ()
    return QuantPlan(weights=tuple(weights), activations=tuple(activations), attention=tuple(attention),
                     kept_float=tuple(kept))


def _constant_sites(g: GraphIndex, taken: set[str], patterns: list[re.Pattern],
                    kept: list[tuple[str, str]]) -> list[WeightSite]:
    sites = []
    for t in g.graph.tensors().values():
        if not isinstance(t, gs.Constant) or t.name in taken or len(t.shape) < 2:
            continue
        if int(np.prod(t.shape)) < CONSTANT_MIN_SIZE or t.dtype not in _FLOAT_TYPES:
            continue
        readers = g.consumers(t)
        if len(readers) != 1 or readers[0].op in _KIND:
            continue
        reason = keep_float_reason(g, readers[0], patterns)
        if reason is not None:
            kept.append((g.name(readers[0]), f"constant {t.name}: {reason}"))
            continue
        sites.append(WeightSite(node=g.name(readers[0]), initializer=t.name, axis=len(t.shape) - 1,
                                kind=WeightKind.CONSTANT))
    return sites


def _activation_sites(g: GraphIndex, layers: set[str], attention: list[AttentionSite]) -> list[ActivationSite]:
    """One site per quantized value, in graph order of its first quantized consumer."""
    attn_inputs: dict[str, list[tuple[int, str, ActivationKind]]] = {}
    for s in attention:
        attn_inputs.setdefault(s.qk_matmul, []).extend([(0, s.q_value, ActivationKind.ATTN_Q),
                                                        (1, s.k_value, ActivationKind.ATTN_K)])
        attn_inputs.setdefault(s.av_matmul, []).extend([(0, s.probs_value, ActivationKind.ATTN_PROBS),
                                                        (1, s.v_value, ActivationKind.ATTN_V)])
    kinds: dict[str, ActivationKind] = {}
    consumers: dict[str, list[str]] = {}
    for node in g.graph.nodes:
        entries: list[tuple[str, ActivationKind]] = []
        if node.name in layers:
            entries.append((node.inputs[0].name, ActivationKind.LAYER_INPUT))
        entries.extend((value, kind) for _, value, kind in attn_inputs.get(node.name, ()))
        for value, kind in entries:
            if value not in kinds or kinds[value] == ActivationKind.LAYER_INPUT:
                kinds[value] = kind  # an attention kind wins over LAYER_INPUT
            users = consumers.setdefault(value, [])
            if node.name not in users:
                users.append(node.name)
    return [ActivationSite(value=v, consumers=tuple(consumers[v]), kind=kinds[v]) for v in consumers]
