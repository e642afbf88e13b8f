"""Frozen configuration objects. Defaults live here and nowhere else (the CLI reads them from here)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import InputError

# Modules that the SAM PTQ papers (PTQ4SAM, CAR-SAM, SAQ-SAM) keep in float. Patterns are regular
# expressions searched in ONNX node names and in the module path kept in node metadata
# ("/image_encoder.patch_embed.proj/Conv" from the dynamo exporter, "/image_encoder/patch_embed/proj/Conv"
# from the TorchScript exporter).
DEFAULT_KEEP_FLOAT: tuple[str, ...] = (
    r"patch_embed",                      # patch embedding
    r"output_upscaling",                 # mask upscaling (ConvTranspose + LayerNorm2d)
    r"output_hypernetworks_mlps",        # hypernetwork MLPs
    r"iou_prediction_head",              # IoU head
    r"prompt_encoder",                   # prompt encoder
)


@dataclass(frozen=True)
class BitWidths:
    """`wXaY`: X-bit weights, Y-bit activations (Y = 16 means activations stay float)."""

    weight: int
    activation: int  # 16 -> not quantized

    @property
    def quantize_activations(self) -> bool:
        return self.activation < 16

    @property
    def weight_container_bits(self) -> int:
        return 4 if self.weight <= 4 else 8

    @property
    def activation_container_bits(self) -> int:
        return 4 if self.activation <= 4 else 8

    def __str__(self) -> str:
        return f"w{self.weight}a{self.activation}"

    @classmethod
    def parse(cls, text: str) -> "BitWidths":
        m = re.fullmatch(r"w(\d+)a(\d+)", text.strip().lower())
        if not m:
            raise InputError(f"--bits {text!r} is not of the form wXaY (e.g. w8a8, w4a4, w4a16)")
        w, a = int(m.group(1)), int(m.group(2))
        if not 2 <= w <= 8:
            raise InputError(f"--bits {text}: weight bits must be 2..8")
        if not (2 <= a <= 8 or a == 16):
            raise InputError(f"--bits {text}: activation bits must be 2..8, or 16 for float activations")
        return cls(w, a)


CALIBRATION_METHODS: tuple[str, ...] = ("minmax", "percentile", "mse")


@dataclass(frozen=True)
class QuantConfig:
    bits: BitWidths = BitWidths(8, 8)
    method: str = "minmax"                 # minmax | percentile | mse | carsam ...
    target: str = "ort"                    # ort: asymmetric activations; trt: symmetric, zero-point 0
    block_size: int | None = None          # blocked INT4 weights (None: per output channel)
    percentile: float = 99.99
    keep_float: tuple[str, ...] = DEFAULT_KEEP_FLOAT
    num_calib: int = 32
    seed: int = 0
    device: str = "cpu"
    require_attention: bool = False

    def __post_init__(self):
        if self.method not in CALIBRATION_METHODS:
            raise InputError(f"--method {self.method!r}: choose one of {', '.join(CALIBRATION_METHODS)}")
        if self.target not in ("ort", "trt"):
            raise InputError(f"--target {self.target!r}: choose ort or trt")
        if self.block_size is not None and (self.block_size < 16 or self.block_size & (self.block_size - 1)):
            raise InputError(f"--block-size {self.block_size}: use a power of two >= 16")
        if not 0 < self.percentile <= 100:
            raise InputError(f"--percentile {self.percentile}: must be in (0, 100]")
        if self.num_calib < 1:
            raise InputError(f"--num-calib {self.num_calib}: must be >= 1")

    @property
    def symmetric_activations(self) -> bool:
        return self.target == "trt"


@dataclass(frozen=True)
class ExportConfig:
    model_type: str = "vit_b"
    checkpoint: str | None = None
    seed: int | None = None
    exporter: str = "dynamo"               # dynamo | torchscript
    multimask: bool = False
    split: bool = False
    force: bool = False
    extra_parts: tuple[str, ...] = field(default_factory=tuple)
