"""Calibration results, keyed by ONNX names. No torch here: this is what calib/ hands to passes/.

- activations: value name -> per-tensor quantization (scale, zero point, bits, signedness)
- weights: float initializer name -> per-channel (or blocked) quantization, optionally with the chosen
  integer values (AdaRound-style rounding decided in calibration)
- float_weights: initializer name -> corrected float tensor (MAC / reconstruction changes the weight or bias
  itself); written into the graph before quantization
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from .errors import ModelError


@dataclass(frozen=True)
class ActivationQuant:
    scale: float
    zero_point: int
    bits: int          # grid bits (2..8); the container is INT4/UINT4 for bits <= 4, else INT8/UINT8
    signed: bool       # True: INT container, symmetric grid [-2^(b-1), 2^(b-1)-1]; False: UINT, [0, 2^b-1]

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1


@dataclass(frozen=True)
class WeightQuant:
    scale: np.ndarray            # float32; shape [C] per channel along `axis`, or blocked shape (see block_size)
    axis: int                    # the output-channel axis of the initializer
    bits: int                    # grid bits; symmetric, zero point 0, values in [-2^(b-1), 2^(b-1)-1]
    block_size: int | None = None
    values: np.ndarray | None = None  # int8 integers on the grid; None -> round(w / scale) at emission

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1


@dataclass
class CalibrationArtifact:
    activations: dict[str, ActivationQuant] = field(default_factory=dict)
    weights: dict[str, WeightQuant] = field(default_factory=dict)
    float_weights: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, str] = field(default_factory=dict)   # method, bits, calibration set... -> model metadata

    def check_names(self, model: onnx.ModelProto) -> None:
        """Every key must name a value / initializer of `model`; fail listing the unknown ones."""
        inits = {t.name for t in model.graph.initializer}
        values = inits | {i.name for i in model.graph.input}
        for n in model.graph.node:
            values.update(o for o in n.output if o)
        unknown = sorted(k for k in self.activations if k not in values)
        unknown += sorted(k for k in (*self.weights, *self.float_weights) if k not in inits)
        if unknown:
            shown = ", ".join(unknown[:5]) + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
            raise ModelError(f"calibration artifact names {len(unknown)} tensors not in the model: {shown}")
