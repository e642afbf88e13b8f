"""Find SAM's attention blocks by graph structure (never by node names) and give each one its role.

Each Softmax is a candidate. Rules, in order; the first that fails rejects the candidate with its reason:

1. probs:      the Softmax output (possibly through Cast/Identity/Dropout) enters a MatMul as its left
               operand (attn . V).
2. scores:     walking back from the Softmax input through layout ops, a constant scale (Mul/Div by a
               scalar) and additive score terms (relative-position / bias Adds), we reach a MatMul of two
               activations (Q . K^T).
3. projections: Q, K^T (the Q.K^T inputs) and V (the attn.V right input) each lead back through layout ops
               (Reshape/Transpose/Split/Gather/Slice/Squeeze...), scales and bias Adds to a linear layer (MatMul
               or Gemm with a constant weight): the q/k/v projections; one fused qkv layer or three separate ones.
4. out_proj:   the attn.V output reaches a linear layer through layout ops only.

Roles, by structure:
- fused qkv projection -> image encoder; separate q/k/v -> mask decoder.
- encoder: windowed if the qkv input comes out of a window partition (a 6-D Transpose with permutation
  (0, 1, 3, 2, 4, 5), `view(B, H/ws, ws, W/ws, ws, C).permute(0, 1, 3, 2, 4, 5)`), else global.
- decoder: self-attention if Q and K are projected from the same value. For cross-attention, the token
  stream is the one self-attention runs on: a projection input is on it when, crossing only Adds and layout
  ops, it reaches the input of a self-attention's Q projection or an operand of that input's sum (SAM's
  `queries + query_pe`). Token->image if Q is on the token stream, image->token if K is. The last
  token->image site left without an image->token partner is the final attention; the others are
  paired with the next image->token site in graph order whose keys depend on its output (one
  TwoWayAttentionBlock, the JCAR unit); pair ids count 0, 1, ... in graph order.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import onnx
import onnx_graphsurgeon as gs

from .patterns import LAYOUT_OPS, GraphIndex
from .sites import AttentionSite, Rejection, Role

WINDOW_PARTITION_PERM = (0, 1, 3, 2, 4, 5)
# Ops crossed when tracing the token stream back from a projection input: residual sums and layout ops.
_STREAM_OPS = frozenset({"Add"}) | LAYOUT_OPS
# Ops allowed between the Softmax and attn.V (the value entering attn.V is the one quantized).
_PROBS_OPS = frozenset({"Cast", "Identity", "Dropout"})


@dataclass(frozen=True)
class AttentionMatch:
    """A matched attention block: the site plus what `inspect` shows about how it was matched."""

    site: AttentionSite
    scale: str | None               # Mul on q / Div of the scores by a constant scalar (node name)
    score_terms: tuple[str, ...]    # Add nodes that add relative-position / bias terms to the scores
    windowed: bool | None           # encoder only


class _Reject(Exception):
    """Internal: a rule failed; carries the reason (never leaves this module)."""


def _scores_matmul(g: GraphIndex, softmax: gs.Node) -> tuple[gs.Node, list[gs.Node], list[gs.Node]]:
    """Rule 2: the Q.K^T MatMul behind the Softmax input, with the scale nodes and the score Adds crossed."""
    if g.producer(softmax.inputs[0]) is None:
        raise _Reject("the Softmax input is a graph input or constant, not attention scores")
    return _scores_from(g, softmax.inputs[0], 16)


def _scores_from(g: GraphIndex, t: gs.Tensor, budget: int) -> tuple[gs.Node, list[gs.Node], list[gs.Node]]:
    scales: list[gs.Node] = []
    adds: list[gs.Node] = []
    for _ in range(budget):
        node = g.producer(t)
        if node is None:
            raise _Reject(f"the scores trace back to '{t.name}', a graph input or constant")
        if node.op == "MatMul":
            if len(g.data_inputs(node)) == 2:
                return node, scales, adds
            raise _Reject(f"the scores come from MatMul '{node.name}' with a constant operand "
                          "(a linear layer, not Q.K^T)")
        data = g.data_inputs(node)
        if node.op == "Add" and len(data) == 2:
            # One operand carries the scores, the other an additive term (relative position, mask).
            found, why = [], []
            for d in data:
                try:
                    found.append(_scores_from(g, d, budget - 1))
                except _Reject as e:
                    why.append(str(e))
            if len(found) != 1:
                detail = "both" if found else f"neither ({why[0]})"
                raise _Reject(f"at Add '{node.name}' {detail} of the operands trace back to a Q.K^T MatMul")
            qk, s2, a2 = found[0]
            return qk, scales + s2, adds + [node] + a2
        nxt = g.passes_through(node)
        if nxt is None:
            raise _Reject(f"the scores come from {node.op} '{node.name}', not from a MatMul of two activations")
        if node.op in ("Mul", "Div"):
            scales.append(node)
        elif node.op in ("Add", "Sub"):
            adds.append(node)
        t = nxt
    raise _Reject("no Q.K^T MatMul within 16 ops of the Softmax input")


def _projection(g: GraphIndex, t: gs.Tensor, what: str) -> tuple[gs.Node, list[gs.Node]]:
    """Rule 3: the linear layer that produces `t` (through layout ops, scales and bias Adds)."""
    walk = g.walk_back(t, stop=g.is_linear)
    if g.is_linear(walk.node):
        return walk.node, list(walk.scales)
    where = f"{walk.node.op} '{walk.node.name}'" if walk.node is not None else "a graph input or constant"
    raise _Reject(f"no linear projection behind {what} (the trace stops at {where})")


def _out_projection(g: GraphIndex, av: gs.Node) -> gs.Node:
    """Rule 4: the linear layer fed by the attn.V output through layout ops."""
    node, why = g.walk_forward(av.outputs[0], stop=g.is_linear)
    if node is None:
        raise _Reject(f"the attn.V output does not reach an output projection ({why})")
    return node


def _match(g: GraphIndex, softmax: gs.Node) -> dict:
    """Apply rules 1-4 to one Softmax; returns the matched nodes or raises _Reject."""
    probs = softmax.outputs[0]
    users = g.consumers(probs)
    while len(users) == 1 and users[0].op in _PROBS_OPS:  # e.g. a Cast to fp16 before attn.V
        probs = users[0].outputs[0]
        users = g.consumers(probs)
    avs = [n for n in users if n.op == "MatMul" and n.inputs[0] is probs]
    if len(avs) != 1:
        ops = ", ".join(sorted({n.op for n in users})) or "nothing"
        raise _Reject(f"its output does not enter a MatMul as the left operand (it feeds {ops}): "
                      "not attention probabilities")
    av = avs[0]
    if not g.is_data(av.inputs[1]):
        raise _Reject(f"attn.V MatMul '{av.name}' multiplies by a constant, not by projected values")
    qk, score_scales, adds = _scores_matmul(g, softmax)
    q_proj, q_scales = _projection(g, qk.inputs[0], "Q")
    k_proj, k_scales = _projection(g, qk.inputs[1], "K")
    v_proj, _ = _projection(g, av.inputs[1], "V")
    out_proj = _out_projection(g, av)
    scales = score_scales + q_scales + k_scales
    return dict(qk=qk, softmax=softmax, av=av, q_proj=q_proj, k_proj=k_proj, v_proj=v_proj, out_proj=out_proj,
                scale=scales[0] if scales else None, adds=adds)


def _windowed(g: GraphIndex, qkv: gs.Node) -> bool:
    """True if the qkv input comes out of a window partition (layout ops only, back to the first other op)."""
    t = qkv.inputs[0]
    for _ in range(16):
        node = g.producer(t)
        if node is None:
            return False
        if node.op == "Transpose" and tuple(node.attrs.get("perm", ())) == WINDOW_PARTITION_PERM:
            return True
        if node.op not in LAYOUT_OPS | {"Pad"}:
            return False
        data = g.data_inputs(node)
        if len(data) != 1:
            return False
        t = data[0]
    return False


def _site(g: GraphIndex, m: dict, role: Role, block: int | None = None, pair: int | None = None) -> AttentionSite:
    qk, av = m["qk"], m["av"]
    return AttentionSite(
        role=role, qk_matmul=g.name(qk), softmax=g.name(m["softmax"]), av_matmul=g.name(av),
        q_proj=g.name(m["q_proj"]), k_proj=g.name(m["k_proj"]), v_proj=g.name(m["v_proj"]),
        out_proj=g.name(m["out_proj"]), q_value=qk.inputs[0].name, k_value=qk.inputs[1].name,
        probs_value=av.inputs[0].name, v_value=av.inputs[1].name, pair=pair, block=block)


def match_attention(model: onnx.ModelProto, index: GraphIndex | None = None
                    ) -> tuple[list[AttentionMatch], list[Rejection]]:
    """All attention blocks of `model` in graph order, with match details, and the rejected Softmaxes."""
    g = index or GraphIndex(model)
    matched: list[dict] = []
    rejected: list[Rejection] = []
    for node in g.graph.nodes:
        if node.op != "Softmax":
            continue
        try:
            matched.append(_match(g, node))
        except _Reject as e:
            rejected.append(Rejection(g.name(node), str(e)))

    encoder, decoder = [], []
    for m in matched:
        projs = {id(m["q_proj"]), id(m["k_proj"]), id(m["v_proj"])}
        if len(projs) == 1:
            encoder.append(m)
        elif len(projs) == 3:
            decoder.append(m)
        else:
            rejected.append(Rejection(g.name(m["softmax"]), "Q, K and V share some but not all projections "
                                      "(neither a fused qkv encoder block nor a separate-projection decoder block)"))

    results: list[tuple[gs.Node, AttentionMatch]] = []
    for block, m in enumerate(encoder):
        windowed = _windowed(g, m["q_proj"])
        role = Role.ENCODER_WINDOW if windowed else Role.ENCODER_GLOBAL
        results.append((m["softmax"], _details(m, _site(g, m, role, block=block), windowed)))
    for m, site in _decoder_roles(g, decoder, rejected):
        results.append((m["softmax"], _details(m, site, None)))
    results.sort(key=lambda r: g.index(r[0]))
    return [r[1] for r in results], rejected


def _details(m: dict, site: AttentionSite, windowed: bool | None) -> AttentionMatch:
    return AttentionMatch(site=site, scale=m["scale"].name if m["scale"] is not None else None,
                          score_terms=tuple(a.name for a in m["adds"]), windowed=windowed)


def _decoder_roles(g: GraphIndex, sites: list[dict], rejected: list[Rejection]) -> list[tuple[dict, AttentionSite]]:
    """Self / token->image / image->token / final roles, layer indices and pairs of the decoder sites."""
    selfs, cross = [], []
    for m in sites:
        (selfs if m["q_proj"].inputs[0] is m["k_proj"].inputs[0] else cross).append(m)
    # The token stream: the inputs of self-attention queries, and the operands of `queries + query_pe` sums.
    tokens: set[str] = set()
    for m in selfs:
        q_in = m["q_proj"].inputs[0]
        tokens.add(q_in.name)
        producer = g.producer(q_in)
        if producer is not None and producer.op == "Add":
            tokens.update(t.name for t in g.data_inputs(producer))

    def on_tokens(t: gs.Tensor) -> bool:
        return bool(g.reachable_back(t, _STREAM_OPS) & tokens)

    roles: list[tuple[dict, Role]] = [(m, Role.DECODER_SELF) for m in selfs]
    for m in cross:
        q_tok, k_tok = on_tokens(m["q_proj"].inputs[0]), on_tokens(m["k_proj"].inputs[0])
        if q_tok and not k_tok:
            roles.append((m, Role.DECODER_TOKEN_TO_IMAGE))
        elif k_tok and not q_tok:
            roles.append((m, Role.DECODER_IMAGE_TO_TOKEN))
        else:
            rejected.append(Rejection(g.name(m["softmax"]),
                                      "cross-attention whose token and image streams cannot be told apart "
                                      f"(Q on the token stream: {q_tok}, K on the token stream: {k_tok})"))
    roles.sort(key=lambda r: g.index(r[0]["softmax"]))

    out: list[tuple[dict, AttentionSite]] = []
    layer = -1
    pair = 0
    open_t2i: int | None = None   # index in `out` of a token->image site waiting for its image->token partner
    for m, role in roles:
        if role == Role.DECODER_SELF:
            layer += 1
        block = max(layer, 0)
        if role == Role.DECODER_TOKEN_TO_IMAGE:
            open_t2i = len(out)   # an earlier unpaired token->image stays unpaired
            out.append((m, _site(g, m, role, block=block)))
        elif role == Role.DECODER_IMAGE_TO_TOKEN and open_t2i is not None and g.depends_on(
                m["k_proj"].inputs[0], out[open_t2i][0]["out_proj"]):
            # Same TwoWayAttentionBlock: the image->token keys (tokens) carry the token->image output.
            t2i_m, t2i_site = out[open_t2i]
            out[open_t2i] = (t2i_m, replace(t2i_site, pair=pair))
            out.append((m, _site(g, m, role, block=t2i_site.block, pair=pair)))
            pair += 1
            open_t2i = None
        else:
            out.append((m, _site(g, m, role, block=block)))
    if open_t2i is not None:  # the last token->image with no image->token after it: the final attention
        m, site = out[open_t2i]
        out[open_t2i] = (m, replace(site, role=Role.DECODER_FINAL_TOKEN_TO_IMAGE, block=None, pair=None))
    return out


def find_attention(model: onnx.ModelProto) -> tuple[list[AttentionSite], list[Rejection]]:
    """Every attention block of `model` (graph order) and the Softmaxes not taken as attention, with reasons."""
    matches, rejected = match_attention(model)
    return [m.site for m in matches], rejected


def inspect_attention(model: onnx.ModelProto) -> dict[str, list[dict]]:
    """JSON-ready `{"attention": [...], "attention_rejected": [...]}` for `carsam-onnx inspect --json`."""
    matches, rejected = match_attention(model)
    return {"attention": [_site_dict(m) for m in matches],
            "attention_rejected": [{"softmax": r.softmax, "reason": r.reason} for r in rejected]}


def attention_report(model: onnx.ModelProto) -> list[dict]:
    """One JSON-ready object per attention site (the `attention` key of `inspect --json`)."""
    return inspect_attention(model)["attention"]


def _site_dict(m: AttentionMatch) -> dict:
    s = m.site
    return {"role": s.role.value, "block": s.block, "pair": s.pair,
            "qk_matmul": s.qk_matmul, "softmax": s.softmax, "av_matmul": s.av_matmul,
            "q_proj": s.q_proj, "k_proj": s.k_proj, "v_proj": s.v_proj, "out_proj": s.out_proj,
            "q_value": s.q_value, "k_value": s.k_value, "probs_value": s.probs_value, "v_value": s.v_value,
            "scale": m.scale, "score_terms": list(m.score_terms)}
