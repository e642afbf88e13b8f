"""What the passes find and decide, as plain data keyed by ONNX node / value / initializer names.

find_attention() yields AttentionSite; plan_quantization() yields a QuantPlan; calib/ fills a
CalibrationArtifact (artifact.py) for the plan's sites; emit writes Q/DQ from plan + artifact.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Role(str, Enum):
    ENCODER_WINDOW = "encoder_window"
    ENCODER_GLOBAL = "encoder_global"
    DECODER_SELF = "decoder_self"
    DECODER_TOKEN_TO_IMAGE = "decoder_token_to_image"
    DECODER_IMAGE_TO_TOKEN = "decoder_image_to_token"
    DECODER_FINAL_TOKEN_TO_IMAGE = "decoder_final_token_to_image"


@dataclass(frozen=True)
class AttentionSite:
    role: Role
    qk_matmul: str              # node names
    softmax: str
    av_matmul: str
    q_proj: str                 # projection MatMul/Gemm nodes (the same fused qkv node for all three in the encoder)
    k_proj: str
    v_proj: str
    out_proj: str
    q_value: str                # value names entering the two attention MatMuls
    k_value: str
    probs_value: str
    v_value: str
    pair: int | None = None     # shared by the token->image and image->token sites of one TwoWayAttentionBlock
                                # (ids 0, 1, ... in graph order); None for self-attention and the final attention
    block: int | None = None    # encoder block index / decoder layer index, in graph order; None for the final attention


@dataclass(frozen=True)
class Rejection:
    """A Softmax that was not taken as attention, and why (shown by `inspect`)."""

    softmax: str
    reason: str


class WeightKind(str, Enum):
    LINEAR = "linear"                  # MatMul / Gemm with a constant weight
    CONV = "conv"
    CONV_TRANSPOSE = "conv_transpose"
    CONSTANT = "constant"              # a large float constant that is no layer weight (position embeddings,
                                       # relative-position tables): stored INT8 per channel (last axis), weight-only


class ActivationKind(str, Enum):
    LAYER_INPUT = "layer_input"        # input of a quantized weight layer
    ATTN_Q = "attn_q"                  # Q of Q.K^T (after any scaling that precedes the MatMul)
    ATTN_K = "attn_k"                  # K^T of Q.K^T
    ATTN_PROBS = "attn_probs"          # softmax output entering attn.V
    ATTN_V = "attn_v"                  # V of attn.V


@dataclass(frozen=True)
class WeightSite:
    node: str                   # the MatMul / Gemm / Conv / ConvTranspose node
    initializer: str            # its float weight initializer
    axis: int                   # output-channel axis of the initializer
                                # (MatMul [K,N]: 1; Gemm transB=1: 0; Conv: 0; ConvTranspose: 1)
    kind: WeightKind


@dataclass(frozen=True)
class ActivationSite:
    value: str                          # the ONNX value quantized
    consumers: tuple[str, ...]          # nodes whose input is rewired to the DQ output; other consumers keep float
    kind: ActivationKind


@dataclass(frozen=True)
class QuantPlan:
    weights: tuple[WeightSite, ...]
    activations: tuple[ActivationSite, ...]
    attention: tuple[AttentionSite, ...]
    kept_float: tuple[tuple[str, str], ...] = ()   # (node name, reason) for weight layers left in float
